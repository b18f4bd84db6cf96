"""Text generation over the C kernel's batched key/value-cache decoding (kernels/decode.c).

    dec = Decoder.from_file("runs/small/checkpoint_step_200.h5", threads=1)
    for token_id in dec.generate(dec.tokenizer.encode("def "), 50, Sampler(0.8, seed=0)):
        ...

A Decoder holds `slots` sequences, each with its own context and cache. `step(feeds)` appends
ids to several slots at once -- a new prompt, or the id just generated -- and returns each
one's next-token logits, computed from the new positions only; a slot's logits are bitwise the
same whichever other slots share the step. When a slot's context would pass its limit (the
model's max_seq_len unless `context` is smaller) the kernel keeps its newest half and rebuilds
its cache from it (`slides(slot)` counts this). Sampling is mpitrain.sampler's, vectorised over
the sequences of a step, each with its own settings and generator.

One sequence (infer): `feed`, `generate` on a slot (slot 0 by default). Several sequences
decoded together (the training samples, a server): `generate_batch`, or `step` and
mpitrain.sampler.sample driven by the caller (a server admits and retires sequences slot by
slot: `reset(slot)`, then the prompt in the next step with the running slots' last ids).
"""
import numpy as np

from mpitrain._native import as_ptr, check, kernel
from mpitrain.checkpoint import load_checkpoint
from mpitrain.errors import UserError
from mpitrain.model import Model
from mpitrain.sampler import sample


class Decoder:
    """Sequence slots over a Model's parameters (the model is kept alive by the decoder)."""

    def __init__(self, model: Model, slots=1, context=None, tokenizer=None):
        ffi, lib = kernel()
        self._ffi, self._lib = ffi, lib
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        context = self.config.max_seq_len if context is None else int(context)
        if not 1 <= context <= self.config.max_seq_len:
            raise ValueError(f"context must lie in [1, {self.config.max_seq_len}], got {context}")
        if int(slots) != slots or slots < 1:
            raise ValueError(f"slots must be an integer >= 1, got {slots!r}")
        out = ffi.new("mt_batch **")
        check(lib.mt_batch_new(model._handle, int(slots), context, out), "key/value caches")
        self._handle = ffi.gc(out[0], lib.mt_batch_free)
        self.slots, self.max_context = int(slots), context
        self._last = {}       # slot -> next-token logits after its context's last id
        self.checkpoint = None

    @classmethod
    def from_file(cls, path, threads=1, slots=1):
        """A Decoder over the weights of a checkpoint or weights-only export (verified by
        load_checkpoint, read straight into the model's arena), or of a folder written by
        `export --format hf` (mpitrain/hf_import.py); UserError for a missing, damaged or
        foreign file, or weights that are not finite."""
        from mpitrain import hf_import

        if hf_import.is_hf_folder(path):
            config = hf_import.model_config(path)
            tokenizer = hf_import.read_tokenizer(path)
            if tokenizer.vocab_size != config.vocab_size:
                raise UserError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids, the "
                                f"model {config.vocab_size}")
            model = Model(config, threads=threads)
            hf_import.read_weights(path, config, model.params)
            _check_finite(path, model)
            dec = cls(model, slots=slots, tokenizer=tokenizer)
            dec.checkpoint = hf_import.HFFolder(str(path), config, tokenizer)
            return dec
        config = _peek_model_config(path)
        if config is None:   # let load_checkpoint name what is wrong
            ck = load_checkpoint(path, load_optimizer=False)
            config = ck.model_config
        model = Model(config, threads=threads)
        ck = load_checkpoint(path, params_into=model.params, load_optimizer=False)
        _check_finite(path, model)
        dec = cls(model, slots=slots, tokenizer=ck.tokenizer)
        ck.params = None   # views of the model's arena; the model is what holds the weights
        dec.checkpoint = ck
        return dec

    # ---- contexts -----------------------------------------------------------------------------

    def _slot(self, slot):
        if int(slot) != slot or not 0 <= slot < self.slots:
            raise ValueError(f"slot must lie in [0, {self.slots}), got {slot!r}")
        return int(slot)

    def reset(self, slot=0):
        """Empty a slot's context."""
        check(self._lib.mt_batch_reset(self._handle, self._slot(slot)), "reset")
        self._last.pop(slot, None)

    def length(self, slot=0) -> int:
        """Positions in a slot's context."""
        out = self._ffi.new("int *")
        check(self._lib.mt_batch_length(self._handle, self._slot(slot), out), "length")
        return int(out[0])

    def slides(self, slot=0) -> int:
        """Times a slot's context was cut to its newest half."""
        out = self._ffi.new("uint64_t *")
        check(self._lib.mt_batch_slides(self._handle, self._slot(slot), out), "slides")
        return int(out[0])

    @property
    def rows_computed(self) -> int:
        """Positions the kernel has run through the model since this decoder was made."""
        out = self._ffi.new("uint64_t *")
        check(self._lib.mt_batch_rows(self._handle, out), "rows_computed")
        return int(out[0])

    def context(self, slot=0) -> np.ndarray:
        """The ids a slot's cache holds, int32 (length,)."""
        out = np.empty(self.max_context, np.int32)
        n = self._ffi.new("int *")
        check(self._lib.mt_batch_tokens(self._handle, self._slot(slot), as_ptr(out, "int32_t *"),
                                        n), "context")
        return out[:n[0]].copy()

    # ---- decoding -----------------------------------------------------------------------------

    def step(self, feeds) -> np.ndarray:
        """feeds: (slot, ids) pairs, distinct slots, 1..max_context ids each. Appends the ids
        to the slots' contexts; returns float32 (len(feeds), V): row k the next-token logits
        of feeds[k]'s slot."""
        if not feeds:
            raise ValueError("step needs at least one (slot, ids) pair")
        slots = np.array([self._slot(s) for s, _ in feeds], np.int32)
        if np.unique(slots).size != slots.size:
            raise ValueError("a slot may appear once per step")
        parts = [np.asarray(ids).reshape(-1) for _, ids in feeds]
        counts = np.array([p.size for p in parts], np.int32)
        if counts.min() < 1 or counts.max() > self.max_context:
            raise ValueError(f"a step takes 1..{self.max_context} ids per slot")
        ids = np.concatenate(parts)
        if ids.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        ids = ids.astype(np.int32)
        logits = np.empty((len(feeds), self.config.vocab_size), np.float32)
        check(self._lib.mt_batch_step(self._handle, len(feeds), as_ptr(slots, "int32_t *"),
                                      as_ptr(counts, "int32_t *"), as_ptr(ids, "int32_t *"),
                                      as_ptr(logits)), "decode step")
        for k, s in enumerate(slots):
            self._last[int(s)] = logits[k]
        return logits

    def feed(self, ids, slot=0) -> np.ndarray:
        """Append ids (1-D ints, 1..max_context of them) to a slot's context; returns the
        next-token logits, float32 (V,)."""
        return self.step([(slot, ids)])[0]

    def generate(self, prompt_ids, max_new_tokens, sampler, stop_ids=(), slot=0):
        """One sequence: feed prompt_ids (the newest max_context of them; may be empty to
        continue the slot's context) and yield up to max_new_tokens sampled ids, one at a
        time. Each yielded id is fed back, so afterwards the context ends with the last one.
        Stops after an id in stop_ids."""
        prompt_ids = np.asarray(prompt_ids).reshape(-1)[-self.max_context:]
        if prompt_ids.size:
            logits = self.feed(prompt_ids, slot)
        elif self.length(slot):
            logits = self._last[self._slot(slot)]   # those after the context's last id
        else:
            raise ValueError("nothing to continue: give a prompt")
        for _ in range(max_new_tokens):
            nxt = sampler(logits)
            logits = self.feed([nxt], slot)
            yield nxt
            if nxt in stop_ids:
                return

    def generate_batch(self, prompts, max_new_tokens, samplers, stop_ids=()):
        """Several sequences decoded together: sequence k (slot k, reset first) continues
        prompts[k] (its newest max_context ids, at least one) with samplers[k]. Yields, per
        step, the (k, id) pairs of the sequences still running; a sequence ends after
        max_new_tokens ids or an id in stop_ids (its last id is not fed back)."""
        if not 1 <= len(prompts) <= self.slots or len(samplers) != len(prompts):
            raise ValueError(f"give 1..{self.slots} prompts and one sampler each")
        feeds = []
        for k, p in enumerate(prompts):
            p = np.asarray(p).reshape(-1)[-self.max_context:]
            if not p.size:
                raise ValueError("nothing to continue: give a prompt")
            self.reset(k)
            feeds.append((k, p))
        made = [0] * len(prompts)
        while feeds:
            logits = self.step(feeds)
            ids = sample(logits, [samplers[k] for k, _ in feeds], self.model.threads)
            out = [(k, int(t)) for (k, _), t in zip(feeds, ids)]
            yield out
            feeds = []
            for k, t in out:
                made[k] += 1
                if made[k] < max_new_tokens and t not in stop_ids:
                    feeds.append((k, [t]))


def _check_finite(path, model):
    if not np.isfinite(model.param_buffer).all():
        bad = next(n for n in model.param_names if not np.isfinite(model.params[n]).all())
        raise UserError(f"{path}: the weights contain NaN or Inf (first in {bad}); the run "
                        "that wrote them diverged")


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
