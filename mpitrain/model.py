"""The GPT model over the C kernel: four flat float32 arenas and one C call per step.

    from mpitrain import ModelConfig, Model
    model = Model(ModelConfig.preset("tiny"), seed=0, threads=2)
    loss = model.forward_backward(inputs, targets)   # int [B,T] each; fills model.grads
    norm = model.clip_grad_norm(1.0)
    model.adamw_step(lr=1e-3, step=1)

Memory: `param_buffer`, `grad_buffer`, `m_buffer`, `v_buffer` are 1-D float32 NumPy arrays
owned here (the parameters may instead live in an arena the caller passes, e.g. memory the MPI
workers of one node share); the C model holds pointers into them, and `params` / `grads` (and `adam_m` /
`adam_v`) are named views into them (GPT-2 state_dict names, linear weights [out, in]) -- no
copies, so MPI reductions and HDF5 reads/writes work on the same memory the kernel uses.
Every array is checked (dtype, shape, contiguity, id range) before a pointer reaches C.
"""
import numpy as np

from mpitrain import optim
from mpitrain._native import as_ptr, kernel
from mpitrain.config import ModelConfig

MAX_THREADS = 256   # the optimizer's limit (mpitrain.optim.MAX_THREADS)
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
    return int(lib.mt_num_params(ffi.new("mt_config *", _c_config(config))))


def output_chunk_rows_for(budget_floats, vocab_size) -> int:
    """Rows per chunk of the output layer for a budget of that many floats of logits (the
    kernel's own formula: a multiple of 16, at least 16); a call of N rows uses at most N."""
    ffi, lib = kernel()
    return int(lib.mt_output_chunk_rows(int(budget_floats), int(vocab_size)))


def _c_config(config) -> dict:
    return dict(vocab_size=config.vocab_size, max_seq_len=config.max_seq_len,
                d_model=config.d_model, n_layers=config.n_layers, n_heads=config.n_heads,
                d_ff=config.d_ff)


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
    """A GPT (issue 3's architecture) whose forward/backward runs in the C kernel."""

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
        self.num_params = int(lib.mt_num_params(self._cfg))
        if self.num_params <= 0:
            raise ValueError(f"invalid model configuration: {config}")
        self._table = self._read_table()
        # The C model keeps pointers into these four arrays: they live exactly as long as this
        # object (a caller's arenas must outlive it too) and are exposed read-only as
        # attributes (write into them, never rebind them).
        n = self.num_params
        self._arenas = tuple(_aligned_zeros(n) if a is None else _check_arena(a, n)
                             for a in (param_arena, grad_arena, None, None))
        handle = lib.mt_model_new(self._cfg, *(as_ptr(a) for a in self._arenas), threads)
        if handle == ffi.NULL:
            raise MemoryError("the kernel could not allocate the model")
        self._handle = ffi.gc(handle, lib.mt_model_free)
        if initialize:
            lib.mt_model_init(self._handle, int(seed) & (2 ** 64 - 1))
        self.param_names = [name for name, _, _ in self._table]
        self.param_shapes = {name: shape for name, _, shape in self._table}
        self.params = self._views(self.param_buffer)
        self.grads = self._views(self.grad_buffer)
        self.adam_m = self._views(self.m_buffer)
        self.adam_v = self._views(self.v_buffer)
        self._segments = optim.decay_segments(shape for _, _, shape in self._table)

    @property
    def param_buffer(self):
        """All parameters, 1-D float32 (arena order = param_names order)."""
        return self._arenas[0]

    @property
    def grad_buffer(self):
        """All gradients, 1-D float32, same layout as param_buffer."""
        return self._arenas[1]

    @property
    def m_buffer(self):
        """AdamW first moments, 1-D float32, same layout as param_buffer."""
        return self._arenas[2]

    @property
    def v_buffer(self):
        """AdamW second moments, 1-D float32, same layout as param_buffer."""
        return self._arenas[3]

    def _read_table(self):
        ffi, lib = self._ffi, self._lib
        name = ffi.new("char[128]")
        offset = ffi.new("size_t *")
        ndim = ffi.new("int *")
        shape = ffi.new("int[2]")
        table = []
        for i in range(lib.mt_num_tensors(self._cfg)):
            if lib.mt_tensor_info(self._cfg, i, name, 128, offset, ndim, shape) != 0:
                raise RuntimeError(f"kernel tensor table: entry {i} unreadable")
            table.append((ffi.string(name).decode(), int(offset[0]),
                          tuple(int(shape[k]) for k in range(ndim[0]))))
        return table

    def _views(self, buffer):
        return {name: buffer[off:off + int(np.prod(shape))].reshape(shape)
                for name, off, shape in self._table}

    # ---- threads and counters ---------------------------------------------------------------

    @property
    def threads(self):
        return int(self._lib.mt_model_threads(self._handle))

    @threads.setter
    def threads(self, value):
        value = _check_threads(value)
        rc = self._lib.mt_model_set_threads(self._handle, value)
        if rc == -3:
            self._check(rc, "threads")
        if rc != 0:
            raise MemoryError(f"the kernel could not start {value} threads")

    @property
    def work_parts(self):
        """Parts each step's work is split into: by default min(threads, CPUs available), since
        more parts than CPUs only add overhead (the extra threads sleep at the barriers).
        Setting a number (1..threads) forces that split; 0 restores the default."""
        return int(self._lib.mt_model_parts(self._handle))

    @work_parts.setter
    def work_parts(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                or not 0 <= value <= self.threads:
            raise ValueError(f"work_parts must be an integer in [0, threads={self.threads}], "
                             f"got {value!r}")
        self._check(self._lib.mt_model_set_parts(self._handle, int(value)), "work_parts")

    @property
    def output_chunk_budget(self):
        """Floats of logits one chunk of the output layer may hold (kernels/loss.c): the
        chunk has output_chunk_rows_for(budget, V) rows. 16M (64 MB) by default; setting 0
        restores that. Smaller budgets are for tests (the multi-chunk path on small models);
        the rows change the summation order of lm_head's gradient, so results depend on it."""
        return int(self._lib.mt_model_chunk_budget(self._handle))

    @output_chunk_budget.setter
    def output_chunk_budget(self, floats):
        if isinstance(floats, bool) or not isinstance(floats, (int, np.integer)) or floats < 0:
            raise ValueError(f"output_chunk_budget must be a non-negative integer, got "
                             f"{floats!r}")
        self._check(self._lib.mt_model_set_chunk_budget(self._handle, int(floats)),
                    "output_chunk_budget")

    @property
    def output_chunk_rows(self):
        """Rows of the output layer's current chunk (0 before the first training or loss
        call): a call of N rows runs ceil(N / output_chunk_rows) chunks."""
        return int(self._lib.mt_model_chunk_rows(self._handle))

    def counters(self):
        """(training calls, windows) processed by forward_backward in this process."""
        calls = self._ffi.new("uint64_t *")
        windows = self._ffi.new("uint64_t *")
        self._lib.mt_counters(self._handle, calls, windows)
        return int(calls[0]), int(windows[0])

    def thread_windows(self):
        """Per kernel thread: training windows whose row-local work it did (list, threads)."""
        out = self._ffi.new("uint64_t[]", self.threads)
        n = self._lib.mt_thread_windows(self._handle, out, self.threads)
        return [int(out[t]) for t in range(n)]

    def timers(self):
        """Seconds per layer kind (embedding, layernorm, matmul, attention, gelu, output+loss,
        sync, other) spent by the kernel's thread 0 since creation; "sync" is its waiting at
        barriers. For profiling (scripts/bench_kernel.py)."""
        lib, ffi = self._lib, self._ffi
        return {ffi.string(lib.mt_timer_name(k)).decode(): float(lib.mt_timer_seconds(self._handle, k))
                for k in range(lib.mt_timer_count())}

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

    def _check(self, rc, what):
        if rc == -3:
            raise RuntimeError(f"{what}: another call on this model is running (a Model is "
                               f"not shared between Python threads; use its own threads)")
        if rc == -2:
            raise MemoryError(f"{what}: the kernel ran out of memory")
        if rc != 0:
            raise ValueError(f"{what}: the kernel refused its arguments (code {rc})")

    # ---- compute ----------------------------------------------------------------------------

    def forward(self, inputs, last_only=False):
        """Logits float32 (B,T,V); with last_only, (B,V) of the last position (generation)."""
        inputs = self._ids(inputs, "inputs")
        B, T = inputs.shape
        V = self.config.vocab_size
        logits = np.empty((B, V) if last_only else (B, T, V), np.float32)
        rc = self._lib.mt_forward_logits(self._handle, as_ptr(inputs, "int32_t *"), B, T,
                                         1 if last_only else 0, as_ptr(logits))
        self._check(rc, "forward")
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
            self._check(rc, "forward_backward")
            return float(loss[0])
        rc = self._lib.mt_forward_backward(self._handle, as_ptr(inputs, "int32_t *"),
                                           as_ptr(targets, "int32_t *"), B, T, scale,
                                           1 if accumulate else 0, loss)
        self._check(rc, "forward_backward")
        return float(loss[0])

    def loss(self, inputs, targets):
        """Mean loss over the B*T targets, forward only (evaluation); grads untouched."""
        inputs, targets = self._pair(inputs, targets)
        B, T = inputs.shape
        loss = self._ffi.new("double *")
        rc = self._lib.mt_loss(self._handle, as_ptr(inputs, "int32_t *"),
                               as_ptr(targets, "int32_t *"), B, T, loss)
        self._check(rc, "loss")
        return float(loss[0])

    # ---- optimizer (kernels/optimizer.c) ----------------------------------------------------

    def grad_norm(self):
        """Global L2 norm of all gradients (squares summed in double, fixed order)."""
        return float(optim.grad_norm(self.grad_buffer, threads=self.threads))

    def clip_grad_norm(self, max_norm):
        """Scale grads so their norm is at most max_norm (as torch's clip_grad_norm_);
        returns the norm before clipping."""
        return float(optim.clip_grad_norm(self.grad_buffer, max_norm, threads=self.threads))

    def adamw_step(self, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01):
        """One AdamW update (PyTorch semantics; decay on tensors of 2+ dims). step is the
        1-based optimizer step used for bias correction."""
        optim.adamw_step(self.param_buffer, self.grad_buffer, self.m_buffer, self.v_buffer,
                         lr=lr, step=step, beta1=beta1, beta2=beta2, eps=eps,
                         weight_decay=weight_decay, segments=self._segments,
                         threads=self.threads)
