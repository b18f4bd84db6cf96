"""A split's token stream read in place: windows without a private copy of the tokens.

A split is a list of [start, end) ranges of the dataset's /tokens array (dataset.py); its
stream is those ranges concatenated. `SplitStream` maps a position in the stream to one in the
array instead of building the stream, so a worker holds only the windows of its step:

  - /tokens stored contiguous and uncompressed (what `mpitrain prepare` writes): the array is
    mapped read-only with np.memmap at its offset in the file, so the node's page cache holds
    one copy that every worker of the node shares. After each read the mapping's pages are
    released from this process (pages.py: the page cache keeps them), so a worker's
    resident set does not grow with the windows it has visited over a long run.
  - any other layout (chunked, compressed: a file made elsewhere): the covering pieces of
    each window are read through h5py, one slice each.

Either way the bytes are those of the concatenated stream, so windows are bitwise the same as
cutting them out of `Dataset.split_tokens`.
"""
import h5py
import numpy as np

from mpitrain import pages
from mpitrain.errors import UserError
from mpitrain.hdf5_damage import open_ours, reading


class SplitStream:
    """The token stream of one split of the dataset file `path`, read on demand.

    ranges: [k,2] int64 token ranges of the split; vocab_size: ids at or above it are damage.
    """

    def __init__(self, path, ranges, vocab_size: int):
        self.path = path
        self.vocab_size = vocab_size
        ranges = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
        lengths = ranges[:, 1] - ranges[:, 0]
        self.ends = np.cumsum(lengths)              # stream end of each range
        self.shift = ranges[:, 0] - (self.ends - lengths)  # array position - stream position
        self.size = int(self.ends[-1]) if len(self.ends) else 0
        self._map = self._file = None
        with reading(path, "; prepare it again"), open_ours(path) as f:
            tokens = f["tokens"]
            self.dtype = tokens.dtype
            offset = _contiguous_offset(tokens)
            n = tokens.shape[0]
        if offset is not None and n:
            self._map = np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=(n,))
        else:  # read piece by piece through HDF5, keeping the file open
            self._file = open_ours(path)
            self._tokens = self._file["tokens"]

    @property
    def mapped(self) -> bool:
        """True when the tokens are read through a memory map (one copy per node)."""
        return self._map is not None

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._map = None

    # ------------------------------------------------------------------ reading
    def read(self, lo: int, hi: int) -> np.ndarray:
        """Stream positions [lo, hi) (clipped to the stream), in the file's dtype."""
        lo, hi = max(0, int(lo)), min(self.size, int(hi))
        if hi <= lo:
            return np.zeros(0, dtype=self.dtype)
        return self._check(self._gather(np.arange(lo, hi, dtype=np.int64)))

    def chunks(self, size: int = 1 << 22):
        """The whole stream as consecutive arrays of at most `size` tokens (each checked)."""
        starts = np.concatenate([[0], self.ends[:-1]]) if len(self.ends) else []
        for lo, hi in zip(np.asarray(starts).tolist(), self.ends.tolist()):
            for a in range(lo, hi, size):
                b = min(hi, a + size)
                shift = int(self.shift[np.searchsorted(self.ends, a, side="right")])
                if self._map is not None:
                    out = np.array(self._map[a + shift:b + shift])
                    self._release()
                else:
                    with reading(self.path, "; prepare it again"):
                        out = self._tokens[a + shift:b + shift]
                yield self._check(out)

    def windows(self, ids, seq_len: int):
        """Windows `ids` of seq_len + 1 tokens at stride seq_len (schedule.gather_windows's
        rule on the stream). Returns (inputs, targets), int32 [len(ids), seq_len], C-contiguous."""
        from mpitrain.schedule import window_count

        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = window_count(self.size, seq_len)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise IndexError(f"window ids must be in [0, {n}), got {ids.min()}..{ids.max()}")
        index = ids[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # [B, seq_len + 1]
        windows = self._check(self._gather(index)).astype(np.int32)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def _gather(self, index: np.ndarray) -> np.ndarray:
        """Tokens at stream positions `index` (any shape, all in [0, size))."""
        where = self.shift[np.searchsorted(self.ends, index, side="right")] + index
        if self._map is not None:
            out = self._map[where]          # a copy: fancy indexing of the mapping
            self._release()
            return np.asarray(out)
        return self._read_pieces(where)

    def _release(self) -> None:
        pages.release_covering(self._map.ctypes.data, self._map.nbytes)

    def _read_pieces(self, where: np.ndarray) -> np.ndarray:
        """h5py reads of the runs of consecutive array positions in `where`."""
        flat = where.reshape(-1)
        if not flat.size:
            return np.zeros(where.shape, dtype=self.dtype)
        order = np.argsort(flat, kind="stable")
        srt = flat[order]
        distinct = np.concatenate([[True], np.diff(srt) != 0])
        pos = srt[distinct]                      # sorted distinct positions
        cut = np.flatnonzero(np.diff(pos) != 1) + 1
        starts = np.concatenate([[0], cut])
        stops = np.concatenate([cut, [len(pos)]])
        values = np.empty(len(pos), dtype=self.dtype)
        with reading(self.path, "; prepare it again"):
            for a, b in zip(starts.tolist(), stops.tolist()):
                values[a:b] = self._tokens[int(pos[a]):int(pos[b - 1]) + 1]
        out = np.empty(flat.size, dtype=self.dtype)
        out[order] = values[np.cumsum(distinct) - 1]
        return out.reshape(where.shape)

    def _check(self, tokens: np.ndarray) -> np.ndarray:
        if tokens.size:
            top = int(tokens.max())
            if top >= self.vocab_size:
                raise UserError(f"{self.path} is damaged: token id {top} >= vocabulary size "
                                f"{self.vocab_size}; prepare it again")
        return tokens


def _contiguous_offset(tokens):
    """The byte offset of an h5py dataset's data in its file when it is stored contiguous,
    uncompressed and allocated (so the file's bytes are the array's); else None."""
    if tokens.chunks is not None or tokens.compression is not None or tokens.dtype.byteorder == ">":
        return None
    try:
        offset = tokens.id.get_offset()
    except Exception:  # noqa: BLE001 - h5py raises for storage it cannot describe
        return None
    if offset is None or tokens.id.get_storage_size() != tokens.size * tokens.dtype.itemsize:
        return None
    return int(offset)
