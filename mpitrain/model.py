"""The GPT model over the C kernel: flat float32 arenas and one C call per step.

    from mpitrain import ModelConfig, Model, optim
    model = Model(ModelConfig.preset("tiny"), seed=0, threads=2)
    loss = model.forward_backward(inputs, targets)   # int [B,T] each; fills model.grads
    norm = optim.grad_norm(model)
    optim.update(model, lr=1e-3, step=1, norm=norm, max_norm=1.0)   # clip + AdamW

Memory: `param_buffer`, `grad_buffer` and one arena per optimizer state tensor
(`optimizer_buffers`, named by mpitrain.optim.ADAMW.state) are 1-D float32 NumPy arrays owned
here (the parameters and gradients may instead live in arenas the caller passes, e.g. memory the
MPI workers of one node share); the C model holds pointers into the first two, and `params` /
`grads` / `optimizer_state[state]` are named views into them (GPT-2 state_dict names, linear
weights [out, in]) -- no copies, so MPI reductions and HDF5 reads/writes work on the same memory
the kernel uses. Every array is checked (dtype, shape, contiguity, id range) before a pointer
reaches C.
"""
import numpy as np

from mpitrain import optim
from mpitrain._native import as_ptr, check, kernel
from mpitrain.config import ModelConfig

MAX_THREADS = 256   # kernel threads a Model accepts
ALIGN_BYTES = 64    # arenas start on a cache line


def aligned_arena(raw, n):
    """The first n floats of float32 array `raw` (n + ALIGN_BYTES // 4 long) that start on an
    ALIGN_BYTES boundary."""
    start = (-raw.ctypes.data % ALIGN_BYTES) // 4
    return raw[start:start + n]


def _aligned_zeros(n):
    """n float32 zeros starting on a 64-byte boundary (np.zeros is lazily zeroed memory)."""
    return aligned_arena(np.zeros(n + ALIGN_BYTES // 4, np.float32), n)


def parameter_count(config) -> int:
    """The number of float32 parameters of a model of `config` (its arenas' length)."""
    ffi, lib = kernel()
    out = ffi.new("size_t *")
    check(lib.mt_num_params(ffi.new("mt_config *", _c_config(config)), out), "parameter_count")
    return int(out[0])


def output_chunk_rows_for(budget_floats, vocab_size) -> int:
    """Rows per chunk of the output layer for a budget of that many floats of logits (the
    kernel's own formula: a multiple of 16, at least 16); a call of N rows uses at most N."""
    ffi, lib = kernel()
    out = ffi.new("int *")
    check(lib.mt_output_chunk_rows(int(budget_floats), int(vocab_size), out), "output_chunk_rows")
    return int(out[0])


def _c_config(config) -> dict:
    return dict(vocab_size=config.vocab_size, max_seq_len=config.max_seq_len,
                d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                d_ff=config.d_ff, position=("learned", "rotary").index(config.position),
                init=("normal", "lattice").index(config.init),
                attention=("dense", "ulam").index(config.attention_pattern),
                attention_window=config.attention_window)


def _check_arena(arena, n):
    if not (isinstance(arena, np.ndarray) and arena.dtype == np.float32 and arena.ndim == 1
            and arena.size == n and arena.flags.c_contiguous and arena.flags.writeable):
        raise ValueError(f"an arena must be a writeable contiguous 1-D float32 array of {n} "
                         f"floats")
    if arena.ctypes.data % ALIGN_BYTES:
        raise ValueError(f"an arena must start on a {ALIGN_BYTES}-byte boundary")
    return arena


def _check_threads(threads):
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) \
            or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return int(threads)


class Model:
    """A GPT (docs/DESIGN.md, "The model") whose forward/backward runs in the C kernel."""

    def __init__(self, config, seed=0, threads=1, param_arena=None, grad_arena=None,
                 initialize=True):
        """param_arena, grad_arena: 1-D contiguous float32 arrays of parameter_count(config)
        floats to hold the parameters and the gradients instead of arenas of our own;
        initialize=False leaves the parameters as they are (another process initialises them)."""
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        threads = _check_threads(threads)
        ffi, lib = kernel()
        self._ffi, self._lib = ffi, lib
        self.config = config
        self._cfg = ffi.new("mt_config *", _c_config(config))
        self.num_params = parameter_count(config)
        self._table = self._read_table()
        # The C model keeps pointers into the parameter and gradient arrays: they live exactly
        # as long as this object (a caller's arenas must outlive it too) and are exposed
        # read-only as attributes (write into them, never rebind them).
        n = self.num_params
        self._arenas = tuple(_aligned_zeros(n) if a is None else _check_arena(a, n)
                             for a in (param_arena, grad_arena))
        handle = ffi.new("mt_model **")
        check(lib.mt_model_new(self._cfg, *(as_ptr(a) for a in self._arenas), threads, handle),
              "Model")
        self._handle = ffi.gc(handle[0], lib.mt_model_free)
        if initialize:
            check(lib.mt_model_init(self._handle, int(seed) & (2 ** 64 - 1)), "init")
        self.param_names = [name for name, _, _ in self._table]
        self.param_shapes = {name: shape for name, _, shape in self._table}
        self.params = self._views(self.param_buffer)
        self.grads = self._views(self.grad_buffer)
        # One arena per state tensor the optimizer declares (state name -> 1-D float32), and
        # its named views; the optimizer step takes slices of them (mpitrain.optim.update).
        self.optimizer_buffers = {s: _aligned_zeros(n) for s in optim.ADAMW.state}
        self.optimizer_state = {s: self._views(a) for s, a in self.optimizer_buffers.items()}
        self.decay_segments = optim.decay_segments(shape for _, _, shape in self._table)

    @classmethod
    def from_checkpoint(cls, path, threads=1):
        """The model of a checkpoint or weights-only export, verified (UserError, one line,
        for a missing, damaged or foreign file). The file's other contents (configurations,
        step, losses, tokenizer) are its `checkpoint` attribute (mpitrain.checkpoint.Checkpoint,
        without the parameters, which live in the model)."""
        from mpitrain.checkpoint import load_checkpoint

        ck = load_checkpoint(path, load_optimizer=False)
        model = cls(ck.model_config, threads=threads, initialize=False)
        for name in model.param_names:
            model.params[name][...] = ck.params[name]
        ck.params = None
        model.checkpoint = ck
        return model

    @property
    def param_buffer(self):
        """All parameters, 1-D float32 (arena order = param_names order)."""
        return self._arenas[0]

    @property
    def grad_buffer(self):
        """All gradients, 1-D float32, same layout as param_buffer."""
        return self._arenas[1]

    @property
    def optimizer_arenas(self):
        """The optimizer state arenas in the declaration's order (mpitrain.optim.ADAMW.state),
        each 1-D float32 laid out as param_buffer."""
        return [self.optimizer_buffers[s] for s in optim.ADAMW.state]

    def _read_table(self):
        ffi, lib = self._ffi, self._lib
        name = ffi.new("char[128]")
        offset = ffi.new("size_t *")
        ndim = ffi.new("int *")
        shape = ffi.new("int[2]")
        count = ffi.new("int *")
        check(lib.mt_num_tensors(self._cfg, count), "tensor table")
        table = []
        for i in range(count[0]):
            check(lib.mt_tensor_info(self._cfg, i, name, 128, offset, ndim, shape),
                        f"tensor table entry {i}")
            table.append((ffi.string(name).decode(), int(offset[0]),
                          tuple(int(shape[k]) for k in range(ndim[0]))))
        return table

    def _views(self, buffer):
        return {name: buffer[off:off + int(np.prod(shape))].reshape(shape)
                for name, off, shape in self._table}

    # ---- threads and counters ---------------------------------------------------------------

    @property
    def threads(self):
        return self._int(self._lib.mt_model_threads, "threads")

    @threads.setter
    def threads(self, value):
        value = _check_threads(value)
        check(self._lib.mt_model_set_threads(self._handle, value), f"{value} threads")

    @property
    def work_parts(self):
        """Parts each step's work is split into: by default min(threads, CPUs available), since
        more parts than CPUs only add overhead (the extra threads sleep at the barriers).
        Setting a number (1..threads) forces that split; 0 restores the default."""
        return self._int(self._lib.mt_model_parts, "work_parts")

    @work_parts.setter
    def work_parts(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value <= self.threads:
            raise ValueError(f"work_parts must be an integer in [0, threads={self.threads}], "
                             f"got {value!r}")
        check(self._lib.mt_model_set_parts(self._handle, int(value)), "work_parts")

    @property
    def output_chunk_budget(self):
        """Floats of logits one chunk of the output layer may hold (kernels/loss.c): the
        chunk has output_chunk_rows_for(budget, V) rows. 16M (64 MB) by default; setting 0
        restores that. Smaller budgets are for tests (the multi-chunk path on small models);
        the rows change the summation order of lm_head's gradient, so results depend on it."""
        out = self._ffi.new("size_t *")
        check(self._lib.mt_model_chunk_budget(self._handle, out), "output_chunk_budget")
        return int(out[0])

    @output_chunk_budget.setter
    def output_chunk_budget(self, floats):
        if isinstance(floats, bool) or not isinstance(floats, (int, np.integer)) or floats < 0:
            raise ValueError(f"output_chunk_budget must be a non-negative integer, got "
                             f"{floats!r}")
        check(self._lib.mt_model_set_chunk_budget(self._handle, int(floats)),
              "output_chunk_budget")

    @property
    def output_chunk_rows(self):
        """Rows of the output layer's current chunk (0 before the first training or loss
        call): a call of N rows runs ceil(N / output_chunk_rows) chunks."""
        out = self._ffi.new("int *")
        check(self._lib.mt_model_chunk_rows(self._handle, out), "output_chunk_rows")
        return int(out[0])

    def counters(self):
        """(training calls, windows) processed by forward_backward in this process."""
        calls = self._ffi.new("uint64_t *")
        windows = self._ffi.new("uint64_t *")
        check(self._lib.mt_counters(self._handle, calls, windows), "counters")
        return int(calls[0]), int(windows[0])

    def thread_windows(self):
        """Per kernel thread: training windows whose row-local work it did (list, threads)."""
        n = self.threads
        out = self._ffi.new("uint64_t[]", n)
        check(self._lib.mt_thread_windows(self._handle, out, n), "thread_windows")
        return [int(out[t]) for t in range(n)]

    def timers(self):
        """Seconds per layer kind (embedding, layernorm, matmul, attention, gelu, output+loss,
        sync, other) spent by the kernel's thread 0 since creation; "sync" is its waiting at
        barriers. For profiling (scripts/bench_kernel.py)."""
        lib, ffi = self._lib, self._ffi
        count, name, seconds = ffi.new("int *"), ffi.new("const char **"), ffi.new("double *")
        check(lib.mt_timer_count(count), "timers")
        out = {}
        for k in range(count[0]):
            check(lib.mt_timer_name(k, name), "timers")
            check(lib.mt_timer_seconds(self._handle, k, seconds), "timers")
            out[ffi.string(name[0]).decode()] = float(seconds[0])
        return out

    # ---- input checks -----------------------------------------------------------------------

    def _ids(self, a, name):
        """An int32 C-contiguous (B,T) copy-or-view of a, refusing anything C must not see."""
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{name}: expected a NumPy integer array, got {type(a).__name__}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected an integer dtype, got {a.dtype}")
        if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
            raise ValueError(f"{name}: expected shape (B, T) with B, T >= 1, got {a.shape}")
        if a.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{name}: sequence length {a.shape[1]} exceeds max_seq_len "
                             f"{self.config.max_seq_len}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{name}: token ids must lie in [0, {self.config.vocab_size}), "
                             f"found {lo if lo < 0 else hi}")
        return np.ascontiguousarray(a, dtype=np.int32)

    def _pair(self, inputs, targets):
        inputs = self._ids(inputs, "inputs")
        targets = self._ids(targets, "targets")
        if inputs.shape != targets.shape:
            raise ValueError(f"targets shape {targets.shape} differs from inputs {inputs.shape}")
        return inputs, targets

    def _int(self, getter, what):
        out = self._ffi.new("int *")
        check(getter(self._handle, out), what)
        return int(out[0])

    # ---- compute ----------------------------------------------------------------------------

    def forward(self, inputs, last_only=False):
        """Logits float32 (B,T,V); with last_only, (B,V) of the last position (generation)."""
        inputs = self._ids(inputs, "inputs")
        B, T = inputs.shape
        V = self.config.vocab_size
        logits = np.empty((B, V) if last_only else (B, T, V), np.float32)
        rc = self._lib.mt_forward_logits(self._handle, as_ptr(inputs, "int32_t *"), B, T,
                                         1 if last_only else 0, as_ptr(logits))
        check(rc, "forward")
        return logits

    def forward_backward(self, inputs, targets, grad_scale=None, accumulate=False,
                         partition=None):
        """Mean loss over the B*T targets; grads get d(sum of token losses * grad_scale) --
        written, or added with accumulate=True. grad_scale defaults to 1/(B*T).

        partition: None, or window counts per kernel thread (len <= threads, sum B): thread t
        does the row-local work of the next partition[t] windows (thread mode: thread t is
        worker t); the step then runs on len(partition) threads."""
        inputs, targets = self._pair(inputs, targets)
        B, T = inputs.shape
        scale = 1.0 / (B * T) if grad_scale is None else float(grad_scale)
        if not np.isfinite(scale):
            raise ValueError(f"grad_scale must be finite, got {grad_scale!r}")
        loss = self._ffi.new("double *")
        if partition is not None:
            counts = np.asarray(partition, dtype=np.int64)
            if counts.ndim != 1 or not 1 <= counts.size <= self.threads or np.any(counts < 0) \
                    or counts.sum() != B:
                raise ValueError(f"partition must be 1..threads={self.threads} non-negative "
                                 f"window counts summing to B={B}, got {list(partition)}")
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            rc = self._lib.mt_forward_backward_parts(
                self._handle, as_ptr(inputs, "int32_t *"), as_ptr(targets, "int32_t *"), B, T,
                scale, 1 if accumulate else 0, as_ptr(offsets, "int32_t *"), counts.size, loss)
            check(rc, "forward_backward")
            return float(loss[0])
        rc = self._lib.mt_forward_backward(self._handle, as_ptr(inputs, "int32_t *"),
                                           as_ptr(targets, "int32_t *"), B, T, scale,
                                           1 if accumulate else 0, loss)
        check(rc, "forward_backward")
        return float(loss[0])

    def loss(self, inputs, targets):
        """Mean loss over the B*T targets, forward only (evaluation); grads untouched."""
        inputs, targets = self._pair(inputs, targets)
        B, T = inputs.shape
        loss = self._ffi.new("double *")
        rc = self._lib.mt_loss(self._handle, as_ptr(inputs, "int32_t *"),
                               as_ptr(targets, "int32_t *"), B, T, loss)
        check(rc, "loss")
        return float(loss[0])
