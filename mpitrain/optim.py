"""Checked Python wrappers of the kernel's optimizer (kernels/optimizer.c) on flat float32 arrays.

AdamW follows torch.optim.AdamW (bias correction, decoupled weight decay lr * wd * p), the norm
and clipping follow torch.nn.utils.clip_grad_norm_. The arrays are whole arenas (or any 1-D
float32 arrays of one length); which ranges take weight decay is given by `segments`, built with
`decay_segments` from the tensor shapes in arena order (decay on tensors of 2+ dimensions).
Results are bitwise independent of `threads`.
"""
import numpy as np

from mpitrain._native import as_ptr, kernel
from mpitrain.ops import check_array

MAX_THREADS = 256  # OPT_MAX_THREADS in kernels/optimizer.c


class Segments:
    """Decay ranges of a flat arena: bounds (nseg+1,) int64 from 0 to n, decay (nseg,) uint8."""

    def __init__(self, bounds, decay):
        self.bounds = np.ascontiguousarray(bounds, dtype=np.int64)
        self.decay = np.ascontiguousarray(decay, dtype=np.uint8)
        if self.bounds.ndim != 1 or self.decay.ndim != 1 or len(self.bounds) != len(self.decay) + 1:
            raise ValueError("segments: need nseg+1 bounds and nseg decay flags")
        if len(self.decay) == 0 or self.bounds[0] != 0 or np.any(np.diff(self.bounds) < 0):
            raise ValueError("segments: bounds must start at 0 and not decrease")

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    @classmethod
    def whole(cls, n, decay=True):
        """One segment over all n floats."""
        return cls([0, n], [1 if decay else 0])


def decay_segments(shapes):
    """Segments for tensors laid out back to back in the given order (an iterable of shapes):
    weight decay on every tensor of two or more dimensions, none on biases and LayerNorm."""
    bounds, decay = [0], []
    for shape in shapes:
        bounds.append(bounds[-1] + int(np.prod(shape, dtype=np.int64)))
        decay.append(1 if len(shape) >= 2 else 0)
    return Segments(bounds, decay)


def _threads(threads):
    if not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
    return int(threads)


def _flat(a, name, n=None):
    check_array(a, name)
    if a.ndim != 1 or (n is not None and a.shape[0] != n):
        raise ValueError(f"{name}: expected a 1-D array of {n if n is not None else 'N'} floats, "
                         f"got shape {a.shape}")
    return a


def adamw_step(params, grads, m, v, *, lr, step, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.01, segments=None, threads=1):
    """One AdamW update in place of params, m, v (1-D float32, one length n) from grads.

    step is the 1-based optimizer step (bias correction); segments says which ranges decay
    (default: all of them, as torch.optim.AdamW does for one parameter group)."""
    n = _flat(params, "params").shape[0]
    _flat(grads, "grads", n)
    _flat(m, "m", n)
    _flat(v, "v", n)
    for a, name in ((m, "m"), (v, "v"), (params, "params")):
        if not a.flags.writeable:
            raise ValueError(f"{name}: array must be writeable")
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (1-based), got {step!r}")
    if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and eps >= 0 and weight_decay >= 0):
        raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas=({beta1}, {beta2}), "
                         f"eps={eps}, weight_decay={weight_decay}")
    seg = Segments.whole(n) if segments is None else segments
    if seg.size != n:
        raise ValueError(f"segments cover {seg.size} floats, the arrays hold {n}")
    _, lib = kernel()
    rc = lib.adamw_step_flat(as_ptr(params), as_ptr(grads), as_ptr(m), as_ptr(v), n,
                             as_ptr(seg.bounds, "int64_t *"), as_ptr(seg.decay, "unsigned char *"),
                             len(seg.decay), float(lr), float(beta1), float(beta2), float(eps),
                             float(weight_decay), int(step), _threads(threads))
    if rc != 0:
        raise ValueError("adamw_step_flat refused its arguments")


def grad_norm(grads, threads=1):
    """Euclidean norm of a flat float32 array: squares summed in double in a fixed order."""
    n = _flat(grads, "grads").shape[0]
    _, lib = kernel()
    norm = lib.grad_norm_flat(as_ptr(grads), n, _threads(threads))
    if norm < 0:
        raise MemoryError("grad_norm_flat: out of memory for the partial sums")
    return norm


def clip_grad_norm(grads, max_norm, threads=1):
    """Scale grads in place by max_norm / (norm + 1e-6) when that is below 1 (as
    torch.nn.utils.clip_grad_norm_); returns the norm before clipping. A non-finite norm leaves
    the gradients unchanged and is returned for the caller to act on."""
    n = _flat(grads, "grads").shape[0]
    if not grads.flags.writeable:
        raise ValueError("grads: array must be writeable")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    _, lib = kernel()
    norm = lib.clip_grad_norm_flat(as_ptr(grads), n, float(max_norm), _threads(threads))
    if norm < 0:
        raise MemoryError("clip_grad_norm_flat: out of memory for the partial sums")
    return norm
