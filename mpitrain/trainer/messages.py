"""What Node Zero and the workers say to each other, independent of how it travels.

Node Zero sends Commands; the lead worker (worker 0, MPI rank 1) answers each STEP, EVAL and
SAVE with one Report, and after EVAL and SAVE also sends state (parameters; parameters and
every optimizer state arena, mpitrain.optim.ADAMW.state). Commands and reports are fixed-size
arrays on the wire so MPI moves them as buffers, without pickling:

  command  int64[HEADER + batch_size]: kind, step, lr as the bits of a float64, window count,
           then the step's global window ids (STEP only; unused slots are -1)
  report   float64[REPORT_SIZE]: kind, step, loss (mean over the batch's target tokens, or the
           validation loss), grad_norm (before clipping), 0, 0
"""
from dataclasses import dataclass

import numpy as np

STEP, EVAL, SAVE, STOP = 1, 2, 3, 4
KIND_NAMES = {STEP: "STEP", EVAL: "EVAL", SAVE: "SAVE", STOP: "STOP"}
HEADER = 4
REPORT_SIZE = 6


@dataclass
class Command:
    kind: int
    step: int                       # the optimizer step it belongs to (1-based; 0: initial)
    lr: float = 0.0                 # learning rate of a STEP
    windows: np.ndarray = None      # int64 [batch_size] global training-window ids of a STEP

    def encode(self, batch_size: int) -> np.ndarray:
        buf = np.full(HEADER + batch_size, -1, np.int64)
        n = 0 if self.windows is None else len(self.windows)
        if n > batch_size:
            raise ValueError(f"command carries {n} windows, the message holds {batch_size}")
        buf[0], buf[1], buf[3] = self.kind, self.step, n
        buf[2] = np.array([self.lr], np.float64).view(np.int64)[0]
        if n:
            buf[HEADER:HEADER + n] = self.windows
        return buf

    @classmethod
    def decode(cls, buf: np.ndarray) -> "Command":
        kind, step, n = int(buf[0]), int(buf[1]), int(buf[3])
        if kind not in KIND_NAMES:
            raise ValueError(f"corrupt command message: kind {kind}")
        lr = float(buf[2:3].view(np.float64)[0])
        windows = buf[HEADER:HEADER + n].copy() if n else None
        return cls(kind, step, lr, windows)


@dataclass
class Report:
    kind: int
    step: int
    loss: float = 0.0
    grad_norm: float = 0.0

    def encode(self) -> np.ndarray:
        return np.array([self.kind, self.step, self.loss, self.grad_norm, 0, 0], np.float64)

    @classmethod
    def decode(cls, buf: np.ndarray) -> "Report":
        return cls(int(buf[0]), int(buf[1]), float(buf[2]), float(buf[3]))
