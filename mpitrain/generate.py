"""Text generation over the C kernel's key/value cache (kernels/generate.c).

    gen = Generator.from_file("runs/small/checkpoint_step_200.h5", threads=1)
    sampler = Sampler(temperature=0.8, top_k=40, top_p=0.95, seed=0)
    for token_id in gen.generate(gen.tokenizer.encode("def "), 50, sampler):
        ...

A Generator holds one sequence's context. `feed(ids)` appends ids and returns the next-token
logits (V,) computed from the new positions only; when the context would pass max_seq_len the
kernel keeps its newest half and rebuilds the cache from it (`slides` counts this). Sampling
is NumPy over one row of logits: temperature 0 is greedy (argmax, deterministic); otherwise
softmax(logits / temperature) restricted to the top-k ids and then to the smallest set whose
probability reaches top-p, drawn with a generator seeded by `seed`.
"""
import numpy as np

from mpitrain._native import as_ptr, check, kernel
from mpitrain.checkpoint import load_checkpoint
from mpitrain.errors import UserError
from mpitrain.model import Model


class Sampler:
    """Chooses the next id from a row of logits. temperature 0: greedy; top_k 0 and top_p 1:
    no restriction."""

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, seed=0):
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits):
        """The distribution drawn from (float64 (V,), zeros outside top-k / top-p)."""
        z = np.asarray(logits, np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # the smallest prefix whose mass reaches top_p (always at least one id)
            cut = int(np.searchsorted(cum, self.top_p)) + 1
            keep = np.zeros(p.size, bool)
            keep[order[:cut]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return p

    def __call__(self, logits) -> int:
        if not np.isfinite(logits).all():
            raise ValueError("the logits contain NaN or Inf")
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        p = self.probabilities(logits)
        return int(self.rng.choice(p.size, p=p))


class Generator:
    """One sequence's context over a Model's parameters (kept alive by the generator)."""

    def __init__(self, model: Model, tokenizer=None):
        ffi, lib = kernel()
        self._ffi, self._lib = ffi, lib
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        handle = lib.mt_gen_new(model._handle)
        if handle == ffi.NULL:
            raise MemoryError("the kernel could not allocate the key/value cache")
        self._handle = ffi.gc(handle, lib.mt_gen_free)
        self._logits = np.empty(self.config.vocab_size, np.float32)
        self.checkpoint = None

    @classmethod
    def from_file(cls, path, threads=1):
        """A Generator over the weights of a checkpoint or weights-only export (verified by
        load_checkpoint, read straight into the model's arena; UserError for a missing,
        damaged or foreign file, or weights that are not finite)."""
        config = _peek_model_config(path)
        if config is None:   # let load_checkpoint name what is wrong
            ck = load_checkpoint(path, load_optimizer=False)
            config = ck.model_config
        model = Model(config, threads=threads)
        ck = load_checkpoint(path, params_into=model.params, load_optimizer=False)
        if not np.isfinite(model.param_buffer).all():
            bad = next(n for n in model.param_names if not np.isfinite(model.params[n]).all())
            raise UserError(f"{path}: the weights contain NaN or Inf (first in {bad}); the run "
                            "that wrote them diverged")
        gen = cls(model, ck.tokenizer)
        ck.params = None   # views of the model's arena; the model is what holds the weights
        gen.checkpoint = ck
        return gen

    # ---- context ------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.config.max_seq_len

    def reset(self):
        """Empty the context."""
        self._lib.mt_gen_reset(self._handle)

    def __len__(self):
        return int(self._lib.mt_gen_length(self._handle))

    @property
    def slides(self) -> int:
        return int(self._lib.mt_gen_slides(self._handle))

    @property
    def rows_computed(self) -> int:
        """Positions the kernel has run through the model since this generator was made."""
        return int(self._lib.mt_gen_rows(self._handle))

    def context(self) -> np.ndarray:
        """The ids the cache holds, int32 (len,)."""
        out = np.empty(self.max_context, np.int32)
        n = self._lib.mt_gen_context(self._handle, as_ptr(out, "int32_t *"))
        return out[:n].copy()

    def feed(self, ids) -> np.ndarray:
        """Append ids (1-D ints, 1..max_seq_len of them) to the context; returns the next-token
        logits, float32 (V,) (a view that the next feed overwrites)."""
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
        if not 1 <= ids.size <= self.max_context:
            raise ValueError(f"feed takes 1..{self.max_context} ids, got {ids.size}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        ids = ids.astype(np.int32)
        rc = self._lib.mt_gen_feed(self._handle, as_ptr(ids, "int32_t *"), ids.size,
                                   as_ptr(self._logits))
        check(rc, "feed")
        return self._logits

    def generate(self, prompt_ids, max_new_tokens, sampler, stop_ids=()):
        """Feed prompt_ids (the newest max_seq_len of them; may be empty to continue the
        current context) and yield up to max_new_tokens sampled ids, one at a time. Each
        yielded id is fed back, so afterwards the context ends with the last one. Stops after
        an id in stop_ids."""
        prompt_ids = np.asarray(prompt_ids).reshape(-1)[-self.max_context:]
        if prompt_ids.size:
            logits = self.feed(prompt_ids)
        elif len(self):
            logits = self._logits      # still those after the context's last id
        else:
            raise ValueError("nothing to continue: give a prompt")
        for _ in range(max_new_tokens):
            nxt = sampler(logits)
            logits = self.feed([nxt])
            yield nxt
            if nxt in stop_ids:
                return


def _peek_model_config(path):
    """The ModelConfig stored in a checkpoint's root attributes, or None when it cannot be
    read (load_checkpoint then reports the problem)."""
    import json

    from mpitrain.config import ModelConfig
    from mpitrain.hdf5_damage import is_damage, open_ours

    try:
        with open_ours(path) as f:
            raw = f.attrs["model_config"]
        return ModelConfig.from_dict(json.loads(raw))
    except (KeyError, TypeError, ValueError):   # attribute missing its fields or not JSON
        return None
    except Exception as e:               # missing, not HDF5 or damaged: the loader says which
        if not is_damage(e):
            raise
        return None
