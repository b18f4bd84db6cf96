"""The optimizer: its declaration, and its step on a model's arenas (kernels/optimizer.c).

ADAMW declares the state tensors AdamW keeps beside each parameter, in the kernel's order. What
holds, moves or stores optimizer state follows that declaration instead of naming the tensors:
the model allocates one arena per state tensor (Model.optimizer_buffers), the workers send and
receive each of them (SAVE, resume), a checkpoint stores each as /optimizer/<state>/<param>
(mpitrain/checkpoint.py), and inspect and docs/FORMATS.md list those groups.

update(model, ...) is the one optimizer step: clipping by a given global gradient norm, as
torch.nn.utils.clip_grad_norm_, then AdamW as torch.optim.AdamW (bias correction, decoupled
weight decay lr * wd * p on tensors of 2+ dimensions), in one kernel call on the model's thread
pool. The norm is an argument because under MPI it is the norm of every worker's share:
grad_norm(model, grads) of each share, combined by the caller. Results are bitwise
independent of the model's threads and work parts.
"""
from dataclasses import dataclass

import numpy as np

from mpitrain._native import as_ptr, check


@dataclass(frozen=True)
class Optimizer:
    name: str
    state: tuple      # names of the per-parameter state tensors, in the kernel's order
    describe: dict    # state name -> what it holds (inspect, docs)


ADAMW = Optimizer(name="adamw", state=("m", "v"),
                  describe={"m": "Adam first moment", "v": "Adam second moment"})


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

    def slice(self, lo: int, hi: int) -> "Segments":
        """The segments of arena range [lo, hi), rebased to start at 0."""
        bounds, decay = [0], []
        for k in range(len(self.decay)):
            a, b = max(int(self.bounds[k]), lo), min(int(self.bounds[k + 1]), hi)
            if a < b:
                bounds.append(b - lo)
                decay.append(int(self.decay[k]))
        if not decay:  # an empty range (more workers than parameters)
            return Segments([0, 0], [0])
        return Segments(bounds, decay)


def decay_segments(shapes):
    """Segments for tensors laid out back to back in the given order (an iterable of shapes):
    weight decay on every tensor of two or more dimensions, none on biases and LayerNorm."""
    bounds, decay = [0], []
    for shape in shapes:
        bounds.append(bounds[-1] + int(np.prod(shape, dtype=np.int64)))
        decay.append(1 if len(shape) >= 2 else 0)
    return Segments(bounds, decay)


def _flat_grads(grads, n, writeable):
    if not (isinstance(grads, np.ndarray) and grads.dtype == np.float32 and grads.ndim == 1
            and grads.size == n and grads.flags.c_contiguous):
        raise ValueError(f"grads must be a contiguous 1-D float32 array of {n} floats")
    if writeable and not grads.flags.writeable:
        raise ValueError("grads must be writeable (clipping scales them in place)")
    return grads


def grad_norm(model, grads=None) -> float:
    """Euclidean norm of `grads` (1-D float32; default the model's gradient arena), squares
    summed in double in a fixed order, on the model's thread pool."""
    grads = model.grad_buffer if grads is None else _flat_grads(grads, np.size(grads), False)
    ffi, lib = model._ffi, model._lib
    out = ffi.new("double *")
    check(lib.mt_grad_norm(model._handle, as_ptr(grads), grads.size, out), "grad_norm")
    return float(out[0])


def train_settings(tc) -> dict:
    """update's keyword arguments from a TrainConfig (clip: 0 or less disables clipping)."""
    return dict(max_norm=tc.clip, beta1=tc.beta1, beta2=tc.beta2, eps=tc.eps,
                weight_decay=tc.weight_decay)


def update(model, *, lr, step, norm, max_norm=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
           weight_decay=0.01, lo=0, hi=None, grads=None) -> None:
    """One optimizer step on arena range [lo, hi) (default all) of the model's parameters and
    optimizer state, from `grads` (that range's gradients; default the model's own).

    norm is the global gradient norm before clipping. With max_norm > 0 (0 or less: no
    clipping), a finite norm and a coefficient max_norm / (norm + 1e-6) below 1, the gradients
    are first scaled by it in place. step is the 1-based optimizer step (bias correction)."""
    n = model.num_params
    hi = n if hi is None else hi
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"arena range [{lo}, {hi}) is not within [0, {n})")
    grads = model.grad_buffer[lo:hi] if grads is None else _flat_grads(grads, hi - lo, True)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer >= 1 (1-based), got {step!r}")
    ffi, lib = model._ffi, model._lib
    segments = model.decay_segments if (lo, hi) == (0, n) else model.decay_segments.slice(lo, hi)
    state = [model.optimizer_buffers[s][lo:hi] for s in ADAMW.state]
    pointers = ffi.new("float *[]", [as_ptr(a) for a in state])
    hyper = ffi.new("mt_adamw *", dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                       weight_decay=weight_decay, step=int(step)))
    status = lib.mt_optim_step(
        model._handle, as_ptr(model.param_buffer[lo:hi]), as_ptr(grads), pointers, len(state),
        hi - lo, as_ptr(segments.bounds, "int64_t *"), as_ptr(segments.decay, "unsigned char *"),
        len(segments.decay), hyper, float(norm), float(max_norm))
    check(status, f"optimizer step {step} (lr {lr}, betas ({beta1}, {beta2}), eps {eps}, "
                  f"weight_decay {weight_decay})")
