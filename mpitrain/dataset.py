"""The dataset file (hdf5_data/NAME.h5): its layout, writer and reader.

Layout (docs/FORMATS.md, "Dataset", describes every attribute):
  /                       attributes: format, format_version, counts, settings, and
                          attrs_crc32 over the others (format 2)
  /tokens                 [T] uint16 (vocab <= 65,536) or uint32: every document's ids, each
                          followed by the end-of-document id, in document order
  /documents/offsets      [D+1] int64: document d is tokens[offsets[d]:offsets[d+1]]
  /splits/train/ranges    [k,2] int64: [start, end) token ranges of the training stream
  /splits/val/ranges      [k,2] int64: the same for validation
  /sources/name           [D] UTF-8 strings: where document d came from
  /sources/size           [D] int64 bytes;  /sources/sha256 [D] 64-char hex
  /sources/replaced       [D] int64: U+FFFD replacements made while decoding document d
  /vocab                  the vocabulary (Tokenizer.to_hdf5)
Every object is written without timestamps, in a fixed order, so the same inputs always give
the same bytes.
"""
import os

import h5py
import numpy as np

from mpitrain import formats
from mpitrain.errors import UserError
from mpitrain.hdf5_damage import first_line, is_damage, open_ours, reading
from mpitrain.tokenizer import Tokenizer
from mpitrain.h5attrs import ATTRS_CRC, attrs_crc
from mpitrain.h5attrs import plain as _plain

# 2: the root attributes carry a CRC32 (attrs_crc32); version 1 (without) is read too.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
SPLITS = ("train", "val")
_CHUNK = 1 << 22  # tokens read at a time by the id check of Dataset.open (8-16 MiB)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def tokens_sha256(tokens) -> str:
    """SHA-256 (hex) of the token array's little-endian bytes: the root attribute
    `tokens_sha256` (optional: files before it have none), which lets the nodes of a job check
    that their copies of a dataset hold the same tokens. `tokens`: an array or the h5py
    dataset, read _CHUNK tokens at a time, or prepare's stream of blocks (`.blocks()`)."""
    import hashlib

    h = hashlib.sha256()
    if hasattr(tokens, "blocks"):
        chunks = (block for _, block in tokens.blocks())
    else:
        chunks = (np.asarray(tokens[a:a + _CHUNK]) for a in range(0, tokens.shape[0], _CHUNK))
    for chunk in chunks:
        h.update(chunk.astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def _group(parent, name):
    """create_group without creation/modification times (h5py has no track_times for groups)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    gid = h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl)
    return h5py.Group(gid)


def _dataset(parent, name, data, **kw):
    return parent.create_dataset(name, data=data, track_times=False, **kw)


def write_dataset(f, *, tokens, doc_offsets, splits, sources, tokenizer, attrs):
    """Write a complete dataset into the new, empty h5py.File `f`, opened with
    libver="earliest" (prepare opens it through mpitrain.atomic and renames it into place).

    tokens: 1-D uint16/uint32 array, or an object with .size, .dtype and .blocks() yielding
    (start, array) pieces in order (written block by block: the same bytes); doc_offsets: [D+1] int64; splits: {"train"|"val": [k,2] int64};
    sources: dict of equal-length lists name/size/sha256/replaced; attrs: root attributes
    (written in sorted order, then attrs_crc32: their checksum as read back).
    """
    str_t = h5py.string_dtype("utf-8")
    for key in sorted(attrs):
        f.attrs[key] = attrs[key]
    f.attrs[ATTRS_CRC] = np.uint32(attrs_crc(f.attrs))
    if isinstance(tokens, np.ndarray):
        _dataset(f, "tokens", tokens)
    else:
        out = f.create_dataset("tokens", shape=(tokens.size,), dtype=tokens.dtype,
                               track_times=False)
        for a, block in tokens.blocks():
            out[a:a + block.size] = block
    docs = _group(f, "documents")
    _dataset(docs, "offsets", np.asarray(doc_offsets, dtype=np.int64))
    sp = _group(f, "splits")
    for name in SPLITS:
        g = _group(sp, name)
        ranges = np.asarray(splits[name], dtype=np.int64).reshape(-1, 2)
        _dataset(g, "ranges", ranges)
        g.attrs["tokens"] = int((ranges[:, 1] - ranges[:, 0]).sum())
    src = _group(f, "sources")
    _dataset(src, "name", np.array(sources["name"], dtype=object), dtype=str_t)
    _dataset(src, "size", np.asarray(sources["size"], dtype=np.int64))
    _dataset(src, "sha256", np.array(sources["sha256"], dtype="S64"))
    _dataset(src, "replaced", np.asarray(sources["replaced"], dtype=np.int64))
    tokenizer.to_hdf5(_group(f, "vocab"))


class Dataset:
    """A prepared dataset, read-only. Open with Dataset.open(path)."""

    def __init__(self, path, attrs, tokenizer, doc_offsets, ranges, num_tokens, dtype):
        self.path = path
        self.attrs = attrs
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.seq_len = int(attrs["seq_len"])
        self.doc_offsets = doc_offsets
        self.ranges = ranges          # {"train"|"val": [k,2] int64 token ranges}
        self.num_tokens = num_tokens
        self.dtype = dtype

    @classmethod
    def open(cls, path, check_ids=True):
        """Read the metadata and vocabulary. UserError (one line) for a missing, damaged or
        foreign file. check_ids=False skips the pass over the token array that refuses ids
        outside the vocabulary (a worker opening the file its Node Zero has checked; the
        windows it reads are checked as they are read)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise UserError(f"no such dataset file: {path}")
        if not os.path.isfile(path):
            raise UserError(f"not a file: {path}")
        if not h5py.is_hdf5(path):
            raise UserError(f"{path} is not an HDF5 file (expected a dataset made by "
                            "`mpitrain prepare`)")
        try:
            with open_ours(path) as f:
                fmt = _plain(f.attrs.get("format"))
                if fmt != formats.DATASET:
                    what = f"format={fmt!r}" if fmt is not None else "no format attribute"
                    raise UserError(f"{path} is not an mpitrain dataset ({what}; expected "
                                    f"format={formats.DATASET!r})")
                version = _plain(f.attrs.get("format_version"))
                if type(version) is not int or version not in READS_VERSIONS:
                    raise UserError(f"{path}: dataset format version {version} is not supported "
                                    f"(this mpitrain reads versions "
                                    f"{', '.join(map(str, READS_VERSIONS))}); prepare it again")
                if version >= 2 and (ATTRS_CRC not in f.attrs or
                                     attrs_crc(f.attrs) != _plain(f.attrs[ATTRS_CRC])):
                    raise UserError(f"{path} is damaged: its root attributes fail their "
                                    "checksum; prepare it again")
                attrs = {k: _plain(f.attrs[k]) for k in sorted(f.attrs)}
                tok = Tokenizer.from_hdf5(f["vocab"], where=f"{path}: vocabulary")
                offsets = f["documents/offsets"][()]
                ranges = {s: f[f"splits/{s}/ranges"][()] for s in SPLITS}
                tokens = f["tokens"]
                if not isinstance(tokens, h5py.Dataset):
                    raise ValueError("/tokens is not a dataset")
                num_tokens, dtype = tokens.shape[0], tokens.dtype
                if tokens.ndim != 1 or dtype not in (np.uint16, np.uint32):
                    raise ValueError(f"/tokens is {tokens.ndim}-D {dtype}, expected 1-D uint16/uint32")
                # The token array has no checksum: a damaged id must be refused here, before a
                # trainer starts workers, not when a worker reads its split.
                max_id = max((int(tokens[a:a + _CHUNK].max()) for a in
                              range(0, num_tokens, _CHUNK)), default=0) if check_ids else 0
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
            # ours: a missing member (KeyError), the checks above and the vocabulary's refusals
            # (ValueError); anything else only when h5py raised it (is_damage)
            if not (isinstance(e, (KeyError, ValueError, TypeError)) or is_damage(e)):
                raise
            raise UserError(f"{path} is damaged or incomplete ({first_line(e)}); "
                            "prepare it again") from None
        _check_layout(path, attrs, tok, offsets, ranges, num_tokens)
        if max_id >= tok.vocab_size:
            raise UserError(f"{path} is damaged: token id {max_id} >= vocabulary size "
                            f"{tok.vocab_size}; prepare it again")
        return cls(path, attrs, tok, offsets, ranges, num_tokens, dtype)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def split_tokens(self, split: str) -> np.ndarray:
        """The token stream of `split` ("train" or "val"): 1-D uint16/uint32, documents
        concatenated, each followed by the end-of-document id."""
        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        ranges = self.ranges[split]
        with reading(self.path, "; prepare it again"), open_ours(self.path) as f:
            tokens = f["tokens"]
            if len(ranges) == 1:
                a, b = ranges[0]
                out = tokens[a:b]
            else:
                out = np.concatenate([tokens[a:b] for a, b in ranges])
        if out.size and int(out.max()) >= self.vocab_size:
            raise UserError(f"{self.path} is damaged: token id {int(out.max())} >= vocabulary "
                            f"size {self.vocab_size}; prepare it again")
        return out

    def stream(self, split: str):
        """The token stream of `split` read in place (tokenstream.SplitStream): windows and
        pieces on demand, no copy of the whole stream."""
        from mpitrain.tokenstream import SplitStream

        if split not in self.ranges:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return SplitStream(self.path, self.ranges[split], self.vocab_size)

    def num_windows(self, split: str, seq_len=None) -> int:
        """Training windows of `split`: seq_len + 1 tokens at stride seq_len."""
        seq_len = self.seq_len if seq_len is None else seq_len
        n = int((self.ranges[split][:, 1] - self.ranges[split][:, 0]).sum())
        return max(0, (n - 1) // seq_len)


def _check_layout(path, attrs, tok, offsets, ranges, num_tokens):
    def bad(why):
        raise UserError(f"{path} is damaged ({why}); prepare it again")

    if not isinstance(attrs.get("seq_len"), int) or attrs["seq_len"] < 1:
        bad(f"seq_len attribute {attrs.get('seq_len')!r} is not a positive integer")
    if attrs.get("vocab_size") != tok.vocab_size:
        bad(f"vocab_size attribute {attrs.get('vocab_size')} != vocabulary size {tok.vocab_size}")
    if offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != num_tokens \
            or np.any(np.diff(offsets) <= 0):
        bad("document offsets do not cover the token array")
    for s, r in ranges.items():
        if r.ndim != 2 or r.shape[1] != 2 or len(r) == 0 or np.any(r[:, 0] >= r[:, 1]) \
                or r.min() < 0 or r.max() > num_tokens:
            bad(f"the {s} split's token ranges are invalid")
