"""The training schedule: learning rate by step, the data order, and cutting windows.

docs/DESIGN.md: learning rate rising linearly from 0 over `warmup` steps, then a cosine decay to 10%
of its peak at the planned last step. An epoch is one pass over all training windows (seq_len + 1
tokens at stride seq_len) in an order drawn from a generator seeded by (seed, epoch); step s
takes the next batch_size windows, running on into the next epoch's order when an epoch ends.
The data position (epoch, index in that epoch's order) is what a checkpoint saves.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MIN_LR_FRACTION = 0.1  # the cosine ends at 10% of the peak


def lr_at(step: int, peak_lr: float, warmup: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based).

    Steps 1..warmup: peak * step / warmup (linear from 0, reaching the peak at step `warmup`).
    Steps warmup..total_steps: cosine from the peak down to 10% of it at step total_steps;
    later steps stay at 10%. When warmup >= total_steps the whole run is warmup (no decay):
    the warmup length is a promise about how fast the rate rises, so it is never shortened.
    """
    if step < 1:
        raise ValueError(f"step is 1-based, got {step!r}")
    if warmup > 0 and step <= warmup:
        return peak_lr * step / warmup
    if step >= total_steps:
        return peak_lr * MIN_LR_FRACTION
    progress = (step - warmup) / (total_steps - warmup)  # in (0, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return peak_lr * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * cosine)


def total_steps(num_windows: int, batch_size: int, epochs: int, max_steps: int = 0) -> int:
    """Planned number of optimizer steps: enough batches to see every window `epochs` times
    (ceil(num_windows * epochs / batch_size); the last step may run into the next epoch's
    order), cut to max_steps when that is positive."""
    if num_windows < 1 or batch_size < 1 or epochs < 1 or max_steps < 0:
        raise ValueError(f"need num_windows, batch_size, epochs >= 1 and max_steps >= 0, got "
                         f"{num_windows}, {batch_size}, {epochs}, {max_steps}")
    steps = -(-num_windows * epochs // batch_size)
    return min(steps, max_steps) if max_steps > 0 else steps


@dataclass(frozen=True)
class DataPosition:
    """Where the next window comes from: `index` into epoch `epoch`'s order (both 0-based).
    Always normalised so 0 <= index < num_windows (next_batch never returns index == n)."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(int(d["epoch"]), int(d["index"]))


@lru_cache(maxsize=4)
def _epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_windows)
    order.flags.writeable = False  # shared through the cache
    return order


def epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`: a permutation of 0..num_windows-1 drawn by
    np.random.default_rng((seed, epoch)).permutation(num_windows). Read-only int64 [num_windows]."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    return _epoch_order(int(num_windows), int(seed), int(epoch))


def next_batch(position: DataPosition, batch_size: int, num_windows: int, seed: int):
    """The window ids of the next step and the position after it.

    Returns (ids int64 [batch_size], DataPosition). A batch that runs past the end of an epoch
    continues at the start of the next epoch's order (and so on, if batch_size > num_windows).
    """
    if num_windows < 1 or batch_size < 0:
        raise ValueError(f"need num_windows >= 1 and batch_size >= 0, got {num_windows}, "
                         f"{batch_size}")
    if not 0 <= position.index < num_windows:
        raise ValueError(f"data position index {position.index} outside [0, {num_windows})")
    epoch, index = position.epoch, position.index
    parts, need = [], batch_size
    while need > 0:
        take = min(need, num_windows - index)
        parts.append(epoch_order(num_windows, seed, epoch)[index:index + take])
        need -= take
        index += take
        if index == num_windows:
            epoch, index = epoch + 1, 0
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return ids.astype(np.int64, copy=True), DataPosition(epoch, index)


def eval_window_ids(num_val_windows: int, count: int) -> np.ndarray:
    """The fixed validation windows of every evaluation: `count` ids spread evenly over the
    split (id i * num_val_windows // count), or all of them when count >= num_val_windows.
    int64 [min(count, num_val_windows)], sorted and distinct."""
    if num_val_windows < 0 or count < 0:
        raise ValueError(f"need non-negative counts, got {num_val_windows}, {count}")
    if count >= num_val_windows:
        return np.arange(num_val_windows, dtype=np.int64)
    return np.arange(count, dtype=np.int64) * num_val_windows // count


def window_count(n_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens at stride seq_len that fit in n_tokens tokens:
    window i covers tokens[i * seq_len : i * seq_len + seq_len + 1]."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (int(n_tokens) - 1) // seq_len)


def gather_windows(tokens: np.ndarray, ids, seq_len: int):
    """Cut windows `ids` out of a 1-D token stream.

    Returns (inputs, targets), both int32 [len(ids), seq_len], C-contiguous:
    inputs[b] = tokens[i*seq_len : i*seq_len + seq_len], targets[b] = the same shifted by one.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = window_count(len(tokens), seq_len)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise IndexError(f"window ids must be in [0, {n}), got {ids.min()}..{ids.max()}")
    index = ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [B, seq_len + 1]
    windows = np.asarray(tokens)[index].astype(np.int32)
    return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
