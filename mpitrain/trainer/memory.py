"""How much memory a run will take on Node Zero's node, estimated before anything is allocated,
so that a request that cannot fit is refused with the estimate instead of ending in a
MemoryError, a killed process or hours of swapping.

The estimate counts what grows with the options (bytes, float32 = 4):

  per model replica  4 arenas (parameters, gradients, Adam m and v) of P floats: 16 P
                     (Node Zero holds one; in MPI mode each worker one, the parameters shared
                     on a node but counted whole: an upper bound)
  activations        the kernel's training rows (kernels/model.c, acts_alloc) for the windows
                     of one kernel call: at most worker.MICRO_WINDOWS windows in MPI mode, the
                     whole batch in thread mode (one call on the shared replica)
                     rows = windows x seq_len; per row L (6C + F + H + 4) + 9C + F + 4 floats
                     and the output layer's chunk of logits (16 Mi floats)
  batch              each step's window ids (int64, LOOKAHEAD + 1 steps in flight) and the
                     gathered windows (two int32 [windows, seq_len] arrays)
  schedule           the epoch order Node Zero draws batches from (int64 per training window;
                     two at an epoch's end)
The token arrays are not counted: workers map the dataset file read-only, so its pages are
the node's page cache, one copy shared by all processes and given back under pressure.

It leaves out what does not grow with the options (the interpreter, NumPy, MPI: about 100 MB a
process). A run is refused when the estimate exceeds the machine's physical memory
(os.sysconf), the limit beyond which it cannot run at all; one that fits only barely may still
swap.
"""
import os

from mpitrain.errors import UserError

CHUNK_FLOATS = 16 << 20     # kernels/model.c: the output layer's chunk budget


def physical_memory():
    """Bytes of physical memory, or None when the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(mc, rows: int) -> int:
    C, F, H, L = mc.d_model, mc.d_ff, mc.n_heads, mc.n_layers
    return 4 * (rows * (L * (6 * C + F + H + 4) + 9 * C + F + 4) + CHUNK_FLOATS)


def estimate(mc, tc, workers_here: int, thread_mode: bool, num_windows: int) -> dict:
    """Bytes by part for Node Zero's node: Node Zero plus `workers_here` worker processes (MPI
    mode), or the one process of thread mode."""
    from mpitrain.model import parameter_count
    from mpitrain.trainer.node_zero import LOOKAHEAD
    from mpitrain.trainer.worker import MICRO_WINDOWS

    P = parameter_count(mc)
    B, T = tc.batch_size, tc.seq_len
    replicas = 1 + (1 if thread_mode else workers_here)
    windows = B if thread_mode else min(B, MICRO_WINDOWS)
    workers = 1 if thread_mode else workers_here
    ids = 8 * B * (LOOKAHEAD + 1) * (1 + workers)
    gathered = 2 * 4 * T * (B if thread_mode else -(-B // max(1, workers_here))) * workers
    return {"parameters and optimizer state": 16 * P * replicas,
            "activations": activation_bytes(mc, windows * T) * workers,
            "batch": ids + gathered,
            "schedule": 2 * 8 * num_windows}


def check(mc, tc, workers_here: int, thread_mode: bool, num_windows: int) -> None:
    """UserError with the estimate when the run cannot fit in this machine's memory."""
    from mpitrain.trainer.saver import fmt_bytes

    have = physical_memory()
    parts = estimate(mc, tc, workers_here, thread_mode, num_windows)
    need = sum(parts.values())
    if have is not None and need > have:
        detail = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in parts.items())
        where = "this process" if thread_mode else f"Node Zero and {workers_here} worker(s)"
        raise UserError(f"this run would need about {fmt_bytes(need)} of memory on this node "
                        f"({where}: {detail}); the machine has {fmt_bytes(have)}: lower "
                        f"--batch-size or the model's size")
