"""Counting distinct pre-tokens in bounded memory: an in-memory table up to a budget, sorted
runs on disk beyond it, and a sort-merge that gives the exact totals.

`Counts.add` counts a list of pre-tokens into a table (a dict {pre-token: id} and a count per
id). When the table's estimated size passes the budget it is spilled: its keys sorted (str order = UTF-8 byte order), written as one run
of records `<u32 length><u64 count><UTF-8 bytes>`, and cleared. `merged_runs` reads any number
of runs (of one process or of several ranks) in one pass and yields (UTF-8 bytes, total
count) in byte order, each pre-token once; `top_pretokens` picks the vocabulary from that
stream with tokenizer.select_pretokens's rule (descending count, ties by bytes ascending),
keeping only the n best in memory.
"""
import heapq
import itertools
import os
import struct

import numpy as np

# Estimated bytes one table entry costs (a str object of a short pre-token, its id, the dict's
# slot and index share, its count in the array), measured on CPython 3.11 with tracemalloc at
# about 136 on bench_data's corpus: the estimate keeps a margin for longer keys and the
# table's growth.
ENTRY_BYTES = 160
_HEAD = struct.Struct("<IQ")
_IO = 1 << 20  # buffer of each run file when written or merged
_COUNT_BLOCK = 1 << 22  # ids counted at a time (np.bincount over the table)


class Counts:
    """Counts of everything added, at most `budget` bytes in memory (estimated).

    The table gives each distinct pre-token an id (0, 1, ... in order of first appearance) and
    counts per id; `add` returns the ids of the pre-tokens it counted, so a caller can keep
    them (prepare encodes from them instead of pre-tokenizing again) as long as the table has
    not been spilled since (`runs` is empty). directory: where runs go (created when the first
    is written); prefix: their names' start, unique per writer (e.g. per rank)."""

    def __init__(self, budget: int, directory: str, prefix: str = "run"):
        self.limit = max(64, int(budget) // ENTRY_BYTES)
        self.directory = directory
        self.prefix = prefix
        self.index = {}    # pre-token -> id, in id order
        self._counts = np.zeros(0, dtype=np.int64)   # per id, of the ids counted so far
        self._pending = []  # id arrays added but not yet counted (counted a block at a time)
        self._pending_n = 0
        self.runs = []     # paths of the runs written, in order
        self.total = 0     # pre-tokens added

    def __len__(self) -> int:
        return len(self.index)

    def add(self, pretokens) -> np.ndarray:
        """Count a list of pre-tokens; returns their ids (uint32) in the table."""
        n = len(pretokens)
        ids = self._ids(pretokens).astype(np.uint32)
        self._pending.append(ids)
        self._pending_n += n
        self.total += n
        if self._pending_n >= _COUNT_BLOCK:
            self._count_pending()
        if len(self.index) > self.limit:
            self.spill()
        return ids

    def merge(self, keys, counts) -> None:
        """Add another table's distinct pre-tokens with their counts (int64, one per key). New
        pre-tokens get the next ids, so the ids given so far stay valid; never spills."""
        ids = self._ids(keys)
        self._count_pending()   # grows the count array to the table's new size
        self._counts[ids] += np.asarray(counts, dtype=np.int64)
        self.total += int(np.sum(counts))

    def _ids(self, pretokens) -> np.ndarray:
        """int64 ids of pretokens (a list), entering the new ones into the table."""
        n = len(pretokens)
        index = self.index
        n0 = len(index)
        # A new pre-token first gets n0 + the position of its first occurrence (above every
        # id in use), then the next free id.
        ids = np.fromiter(map(index.setdefault, pretokens, itertools.count(n0)),
                          dtype=np.int64, count=n)
        first = np.flatnonzero(ids == np.arange(n0, n0 + n))
        if first.size:
            index.update(zip(map(pretokens.__getitem__, first.tolist()),
                             range(n0, n0 + first.size)))
            remap = np.empty(n, dtype=np.int64)
            remap[first] = np.arange(n0, n0 + first.size)
            new = ids >= n0
            ids[new] = remap[ids[new] - n0]
        return ids

    def _count_pending(self) -> None:
        n = len(self.index)
        if len(self._counts) < n:
            grown = np.zeros(max(n, 2 * len(self._counts)), dtype=np.int64)
            grown[:len(self._counts)] = self._counts
            self._counts = grown
        if self._pending:
            c = np.bincount(np.concatenate(self._pending), minlength=n)
            self._counts[:len(c)] += c
        self._pending, self._pending_n = [], 0

    def counts(self) -> np.ndarray:
        """Count per id (int64, one per distinct pre-token in the table)."""
        self._count_pending()
        return self._counts[:len(self.index)]

    def keys(self) -> list:
        """The table's pre-tokens in id order."""
        return list(self.index)

    def items(self):
        """The table's (UTF-8 bytes, count) in byte order, like merged_runs."""
        counts = self.counts().tolist()
        index = self.index
        for key in sorted(index):
            yield key.encode("utf-8"), counts[index[key]]

    def clear(self) -> None:
        """Empty the table (ids start again at 0)."""
        self.index = {}
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending, self._pending_n = [], 0

    def spill(self) -> None:
        """Write the table as a sorted run and clear it (nothing when it is empty)."""
        if not self.index:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{self.prefix}-{len(self.runs):05d}.bin")
        pack = _HEAD.pack
        with open(path, "wb", buffering=_IO) as f:
            for key, c in self.items():
                f.write(pack(len(key), c))
                f.write(key)
        self.runs.append(path)
        self.clear()

    def remove_runs(self) -> None:
        for p in self.runs:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.runs = []


def read_run(path):
    """(UTF-8 bytes, count) records of one run, in its (sorted) order."""
    size, unpack = _HEAD.size, _HEAD.unpack
    with open(path, "rb", buffering=_IO) as f:
        while True:
            head = f.read(size)
            if not head:
                return
            n, c = unpack(head)
            yield f.read(n), c


def merged_runs(paths):
    """(UTF-8 bytes, total count) over all runs, ascending by bytes, each pre-token once."""
    stream = heapq.merge(*(read_run(p) for p in paths))
    for key, group in itertools.groupby(stream, key=lambda kc: kc[0]):
        yield key, sum(c for _, c in group)


class Tally:
    """Counts what passes through: distinct pre-tokens and their total occurrences."""

    def __init__(self):
        self.distinct = 0
        self.total = 0

    def watch(self, items):
        for key, c in items:
            self.distinct += 1
            self.total += c
            yield key, c


def top_pretokens(items, n: int):
    """The n vocabulary pre-tokens (str, in id order) of a (UTF-8 bytes, count) stream of
    distinct pre-tokens: those longer than one byte, by descending count, ties by bytes
    ascending (tokenizer.select_pretokens's rule; bytes order = str order for UTF-8)."""
    if n <= 0:
        for _ in items:  # still consume it (a Tally may be watching)
            pass
        return []
    best = heapq.nsmallest(n, ((-c, key) for key, c in items if len(key) > 1))
    return [key.decode("utf-8") for _, key in best]
