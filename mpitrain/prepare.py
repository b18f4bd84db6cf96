"""`mpitrain prepare`: text sources -> vocabulary + tokenized dataset file, in bounded memory.

Pipeline (each rank handles a contiguous block of sources, balanced by bytes):
  1. read     each source in pieces (corpus.source_pieces: cut where no pre-token and no UTF-8
              sequence spans); NUL -> binary (skipped), invalid UTF-8 -> U+FFFD (counted)
  2. count    pre-tokens (PATTERN) of each piece into a table of distinct pre-tokens, kept in
              memory up to the memory budget and spilled to sorted runs on disk beyond it
              (pretoken_counts); while the table has not spilled, each pre-token's id in it
              goes to the rank's pre-token file (4 bytes a pre-token)
  3. vocab    rank 0 merges every rank's counts -- in memory, or by a sort-merge of the runs --
              and picks the exact top pre-tokens (tokenizer.select_pretokens's rule); broadcast
  4. encode   each pre-token becomes ids (one id, or its UTF-8 bytes' ids) through a table
              in NumPy, + end-of-document id, written to the rank's raw token file: from the
              pre-token file when the rank's table never spilled, else by a second pass over
              the sources (read and pre-tokenized again, a per-piece table)
  5. write    rank 0 splits and writes the file under a temporary name, copying the ranks' raw
              files in rank order (= document order) into /tokens block by block, and renames it
The result depends only on the sources, so any number of ranks and any budget give the same
bytes. The scratch files (runs, pre-token ids, raw tokens) live in `.NAME.prepare-PID` beside
the output, which every rank must see (with several nodes: a shared directory).
"""
import hashlib
import itertools
import math
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from mpitrain import atomic, corpus, formats, pretoken_counts
from mpitrain.dataset import FORMAT_VERSION, token_dtype, tokens_sha256, write_dataset
from mpitrain.errors import UserError
from mpitrain.progress import bar
from mpitrain.tokenizer import MAX_VOCAB_SIZE, PATTERN, SPECIALS, Tokenizer, min_vocab_size

DEFAULT_OUT = os.path.join("hdf5_data", "default.h5")
# The memory budget (per rank) covers the interpreter and libraries, a piece's pre-tokens and
# the encoding tables (FIXED_BYTES, measured at about 120 MB on CPython 3.11 with NumPy and
# h5py, plus margin); the rest is the count table's.
FIXED_BYTES = 192 << 20
MIN_TABLE_BYTES = 16 << 10  # a tiny budget still works (spilling often): tests use it
ENCODE_BLOCK = 1 << 20  # pre-token ids encoded at a time from pass 1's file


def default_memory_budget(ranks: int = 1) -> int:
    """A quarter of the machine's memory, shared by the ranks (at least 256 MiB each)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 << 30
    return max(256 << 20, total // 4 // max(1, ranks))


def parse_size(text: str) -> int:
    """Bytes of a size like 800M, 2G, 1.5G or 100000 (K, M, G, T are powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"--memory-budget must be a size like 800M or 2G, got {text!r}")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


@dataclass
class Options:
    data: str = None          # directory of text; None = the default standard-library corpus
    out: str = DEFAULT_OUT    # dataset file; the vocabulary goes beside it as NAME.vocab.txt
    vocab_size: int = 30000   # total ids: specials + 256 bytes + pre-tokens
    seq_len: int = 128        # training window length the dataset is meant for
    val_fraction: float = 0.01  # validation share (whole documents; see choose_split)
    force: bool = False       # replace an existing output
    quiet: bool = False       # no progress bars
    memory_budget: int = 0    # bytes per rank (see FIXED_BYTES); 0 = default_memory_budget()


# The longest window prepare accepts: attention keeps seq_len x seq_len scores per thread, so
# 16,384 is already 2 GB a thread; beyond it no model mpitrain trains could use the dataset.
MAX_SEQ_LEN = 1 << 14


def check_options(o: Options):
    """Refuse bad numeric options before any work (UserError, one line)."""
    lo = min_vocab_size()
    if not lo <= o.vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(f"--vocab-size must be between {lo} (specials + 256 bytes + 1) and "
                        f"{MAX_VOCAB_SIZE:,}, got {o.vocab_size}")
    if not 0 < o.seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--seq-len must be between 1 and {MAX_SEQ_LEN:,}, got {o.seq_len}")
    if not (0 < o.val_fraction <= 0.5) or math.isnan(o.val_fraction):
        raise UserError(f"--val-fraction must be in (0, 0.5], got {o.val_fraction}")
    if o.memory_budget < 0:
        raise UserError(f"--memory-budget must be positive, got {o.memory_budget}")


def check_output(o: Options):
    """Refuse an output we cannot or must not write. The default directory (hdf5_data under
    the current directory) is created when missing; a directory named by --out must exist."""
    out_dir = os.path.dirname(os.path.abspath(o.out))
    shown_dir = os.path.dirname(o.out) or "."
    if not os.path.isdir(out_dir):
        if o.out != DEFAULT_OUT or os.path.exists(out_dir):
            raise UserError(f"output directory does not exist: {shown_dir}")
    elif not os.access(out_dir, os.W_OK):
        raise UserError(f"output directory is not writable: {shown_dir}")
    if os.path.isdir(o.out):
        raise UserError(f"--out is a directory: {o.out}")
    if not o.out.endswith(".h5"):
        raise UserError(f"--out {o.out}: a dataset file must end in .h5 (it is HDF5, and its "
                        f"vocabulary is written beside it as NAME.vocab.txt)")
    if os.path.exists(o.out) and not o.force:
        raise UserError(f"output exists: {o.out} (use --force to replace it)")


def list_sources(o: Options):
    return corpus.stdlib_sources() if o.data is None else corpus.list_directory(o.data)


def partition(sizes, nranks):
    """Owner rank of each source: contiguous blocks with about equal bytes."""
    sizes = np.asarray(sizes, dtype=np.float64)
    total = sizes.sum()
    if total == 0:
        return np.arange(len(sizes)) * nranks // max(len(sizes), 1)
    starts = np.cumsum(sizes) - sizes
    return np.minimum((starts * nranks / total).astype(np.int64), nranks - 1)


def expand_ranges(starts, lengths):
    """Concatenated aranges [starts[i], starts[i] + lengths[i]) as one int64 array."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0, dtype=np.int64) + \
        np.repeat(np.asarray(starts, dtype=np.int64) - (ends - lengths), lengths)


class _Comm:
    """The few collectives prepare needs; a single process when comm is None."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank() if comm else 0
        self.size = comm.Get_size() if comm else 1

    def agree(self, error):
        """Every rank learns whether any rank failed; all raise the first rank's error."""
        errors = self.comm.allgather(error) if self.comm else [error]
        for e in errors:
            if e:
                raise UserError(e)

    def gather(self, obj):
        return self.comm.gather(obj, root=0) if self.comm else [obj]

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0) if self.comm else obj

    def allgather(self, obj):
        return self.comm.allgather(obj) if self.comm else [obj]


def _local(fn, *args, out=None):
    """Run one phase's local work; a UserError becomes the rank's error message, and so does
    an OSError of the scratch files beside `out` (a full disk)."""
    try:
        return fn(*args), None
    except UserError as e:
        return None, str(e)
    except OSError as e:
        if out is None:
            raise
        return None, f"cannot write {out}: {_os_reason(e)}; nothing was written"


def _count(sources, regex, counts, show, ids_path):
    """Pass 1 over this rank's sources: read each in pieces, decode, pre-tokenize and count
    into `counts`, writing the pre-tokens' ids in the count table (uint32) to `ids_path`
    (created exclusively) until the table first spills; then that file is removed. Returns
    ([(name, bytes, sha256 hex, replacements)] of the text sources, their Sources, pre-tokens
    per text source, whether `ids_path` holds every text source's ids, binary sources
    skipped, seconds spent reading and decoding)."""
    metas, texts, n_pre, n_binary, reading = [], [], [], 0, 0.0
    ids_file = open(ids_path, "xb")
    try:
        with bar(sum(s.size for s in sources), "count", "B", unit_scale=True,
                 enabled=show) as b:
            for s in sources:
                t = time.perf_counter()
                size, sha, binary, data = corpus.scan_source(s)
                reading += time.perf_counter() - t
                if binary:
                    n_binary += 1
                    b.update(s.size)
                    continue
                replaced, n = 0, 0
                h = hashlib.sha256() if data is None else None   # read again in pieces
                pieces = corpus.source_pieces(s, data)
                del data
                while True:
                    t = time.perf_counter()
                    piece = next(pieces, None)
                    if piece is None:
                        break
                    if h is not None:
                        h.update(piece)
                    text, r = corpus.decode(piece)
                    reading += time.perf_counter() - t
                    replaced += r
                    ids = counts.add(regex.findall(text))
                    del text
                    n += ids.size
                    if ids_file is not None and counts.runs:  # spilled: the ids are void
                        ids_file.close()
                        _unlink(ids_path)
                        ids_file = None
                    if ids_file is not None:
                        ids_file.write(ids.data)
                if h is not None and h.hexdigest() != sha:
                    raise UserError(f"{s.path or s.name} changed while it was being "
                                    "prepared; run prepare again")
                metas.append((s.name, size, sha, replaced))
                texts.append(s)
                n_pre.append(n)
                b.update(s.size)
    finally:
        if ids_file is not None:
            ids_file.close()
    return metas, texts, n_pre, ids_file is not None, n_binary, reading


def token_table(keys, tok, dtype=np.int32):
    """How a list of distinct pre-tokens encodes: (starts, lengths, table, fell_back), where
    pre-token i becomes table[starts[i]:starts[i] + lengths[i]] -- its id, or its UTF-8
    bytes' ids -- and fell_back[i] says the latter. Built a block of keys at a time, so a
    table of millions of pre-tokens never holds all their bytes as Python objects."""
    get = tok.ids.get
    singles, lengths, parts = [], [], []
    for a in range(0, len(keys), 1 << 16):
        block = keys[a:a + (1 << 16)]
        single = np.fromiter((get(t, -1) for t in block), dtype=np.int64, count=len(block))
        miss = np.flatnonzero(single < 0)
        miss_bytes = [t.encode("utf-8") for t, m in zip(block, single.tolist()) if m < 0]
        length = np.ones(len(block), dtype=np.int64)
        length[miss] = [len(b) for b in miss_bytes]
        starts = np.cumsum(length) - length
        part = np.empty(int(length.sum()), dtype=dtype)
        hit = np.flatnonzero(single >= 0)
        part[starts[hit]] = single[hit]
        if len(miss):
            raw = np.frombuffer(b"".join(miss_bytes), dtype=np.uint8)
            part[expand_ranges(starts[miss], length[miss])] = raw.astype(dtype) + \
                tok.byte_offset
        singles.append(single)
        lengths.append(length)
        parts.append(part)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    fell_back = np.concatenate(singles) < 0 if singles else np.zeros(0, dtype=bool)
    table = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return np.cumsum(lengths) - lengths, lengths, table, fell_back


def encode_pretokens(pretokens, tok):
    """(int32 ids of a list of pre-tokens, how many of them fell back to bytes): per distinct
    pre-token its id(s) -- one id, or its UTF-8 bytes' ids -- expanded through that table in
    NumPy."""
    n = len(pretokens)
    if not n:
        return np.zeros(0, dtype=np.int32), 0
    index = {}
    position = itertools.count()
    # A new pre-token gets the position of its first occurrence as its provisional id.
    prov = np.fromiter(map(index.setdefault, pretokens, position), dtype=np.int64, count=n)
    u = len(index)
    remap = np.zeros(n, dtype=np.int64)
    remap[np.fromiter(index.values(), dtype=np.int64, count=u)] = np.arange(u)
    d = remap[prov]
    del remap, prov
    starts, lengths, table, fell_back = token_table(list(index), tok)  # ids < 1,000,000
    return table[expand_ranges(starts[d], lengths[d])], int(np.count_nonzero(fell_back[d]))


def _encode(sources, metas, tok, regex, dtype, path, show):
    """Pass 2 over this rank's text sources: encode each, append the end-of-document id and
    write the ids (dtype) to the raw file `path`. Returns (token count per document,
    pre-tokens that fell back to bytes). A source whose bytes changed since pass 1 is refused."""
    doc_tokens, fallback = np.empty(len(sources), dtype=np.int64), 0
    eod = np.array([tok.eod_id], dtype=dtype)
    with open(path, "wb") as f, \
            bar(sum(m[1] for m in metas), "encode", "B", unit_scale=True, enabled=show) as b:
        for k, (s, m) in enumerate(zip(sources, metas)):
            h, n = hashlib.sha256(), 0
            for piece in corpus.source_pieces(s):
                h.update(piece)
                text, _ = corpus.decode(piece)
                ids, fb = encode_pretokens(regex.findall(text), tok)
                del text
                f.write(ids.astype(dtype).data)  # (tofile loses the errno)
                n += ids.size
                fallback += fb
                b.update(len(piece))
            f.write(eod.data)
            if h.hexdigest() != m[2]:
                raise UserError(f"{s.path or s.name} changed while it was being prepared; "
                                "run prepare again")
            doc_tokens[k] = n + 1
    return doc_tokens, fallback


def _encode_ids(table, n_pre, tok, dtype, ids_path, path, show):
    """Pass 2 from pass 1's pre-token ids (no second read of the text): map the ids of each
    text source through `table` (token_table of the count table's pre-tokens in id order),
    append the end-of-document id and write the ids (dtype) to the raw file `path`. Returns
    what _encode returns."""
    starts, lengths, table, fell_back = table
    doc_tokens, fallback = np.empty(len(n_pre), dtype=np.int64), 0
    eod = np.array([tok.eod_id], dtype=dtype)
    with open(ids_path, "rb") as src, open(path, "wb") as f, \
            bar(sum(n_pre), "encode", " pre-tokens", unit_scale=True, enabled=show) as b:
        for k, n in enumerate(n_pre):
            out = 0
            for a in range(0, n, ENCODE_BLOCK):
                d = np.fromfile(src, dtype=np.uint32, count=min(ENCODE_BLOCK, n - a))
                if d.size != min(ENCODE_BLOCK, n - a):
                    raise UserError(f"{ids_path} was cut short while prepare ran; run "
                                    "prepare again")
                ids = table[expand_ranges(starts[d], lengths[d])]
                f.write(ids.data)
                out += ids.size
                fallback += int(np.count_nonzero(fell_back[d]))
                b.update(d.size)
            f.write(eod.data)
            doc_tokens[k] = out + 1
    return doc_tokens, fallback


class RawTokens:
    """The token stream as the ranks wrote it: their raw files in rank order (what
    dataset.write_dataset copies into /tokens block by block)."""

    BLOCK = 1 << 22  # tokens copied at a time

    def __init__(self, paths, dtype):
        self.paths = list(paths)
        self.dtype = np.dtype(dtype)
        self.size = sum(os.path.getsize(p) for p in self.paths) // self.dtype.itemsize

    def blocks(self):
        """(start, array) blocks covering the stream in order."""
        at = 0
        for p in self.paths:
            n = os.path.getsize(p) // self.dtype.itemsize
            with open(p, "rb") as f:
                for a in range(0, n, self.BLOCK):
                    block = np.fromfile(f, dtype=self.dtype, count=min(self.BLOCK, n - a))
                    yield at, block
                    at += block.size


def _vocabulary(o, c, counts, spill, keys):
    """Rank 0's (pretokens, distinct pre-tokens, pre-tokens counted) from every rank's counts:
    merged in memory into rank 0's own table, one rank's table at a time (the sum of the
    tables' sizes fits rank 0's budget), or (spill) through the sorted runs every rank has
    written. keys: this rank's count table's pre-tokens in id order, or None."""
    if spill:
        counts.spill()
        runs = c.gather(counts.runs)
    elif c.size > 1:
        if c.rank == 0:
            for r in range(1, c.size):
                counts.merge(*c.comm.recv(source=r, tag=_MERGE_TAG))
        else:
            c.comm.send((counts.keys() if keys is None else keys, counts.counts()), dest=0,
                        tag=_MERGE_TAG)
    if c.rank != 0:
        return None
    n = o.vocab_size - len(SPECIALS) - 256
    tally = pretoken_counts.Tally()
    if spill:
        items = pretoken_counts.merged_runs([p for r in runs for p in r])
    else:
        items = counts.items()
    pretokens = pretoken_counts.top_pretokens(tally.watch(items), n)
    return pretokens, tally.distinct, tally.total


_MERGE_TAG = 17  # the point-to-point messages of the count tables' merge


def choose_split(doc_tokens, val_fraction):
    """({"train"|"val": [k,2] token ranges}, {"train"|"val": documents}).

    D >= 2 documents: n_val = max(1, round(D * val_fraction)) whole documents are held out,
    spread over the corpus and sized to the target: the documents are cut into n_val
    consecutive blocks (document d is in block floor(d * n_val / D)); in each block the
    document whose token count is closest to val_fraction * T / n_val is held out (ties: the
    first). So validation is about val_fraction of the tokens even when a corpus of few
    documents has one huge one. One document: the last ceil(T * val_fraction) tokens.
    """
    d = len(doc_tokens)
    doc_tokens = np.asarray(doc_tokens, dtype=np.int64)
    ends = np.cumsum(doc_tokens)
    starts = ends - doc_tokens
    if d == 1:
        t = int(ends[0])
        n_val = math.ceil(t * val_fraction)
        if t - n_val < 1 or n_val < 1:
            raise UserError(f"the corpus is one document of {t} token(s): too small to split "
                            "into training and validation")
        return ({"train": np.array([[0, t - n_val]]), "val": np.array([[t - n_val, t]])},
                {"train": 1, "val": 1})
    n_val = min(max(1, round(d * val_fraction)), d - 1)
    target = val_fraction * float(ends[-1]) / n_val
    block = np.arange(d) * n_val // d
    # sort by (block, distance to target, index): each block's first entry is its choice
    order = np.lexsort((np.arange(d), np.abs(doc_tokens - target), block))
    is_val = np.zeros(d, dtype=bool)
    is_val[order[np.searchsorted(block[order], np.arange(n_val))]] = True
    return ({"train": _runs(starts, ends, ~is_val), "val": _runs(starts, ends, is_val)},
            {"train": d - n_val, "val": n_val})


def _runs(starts, ends, mask):
    """Token ranges of the selected documents, adjacent documents merged."""
    out = []
    for a, b in zip(starts[mask].tolist(), ends[mask].tolist()):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def prepare(o: Options, comm=None):
    """Run the whole pipeline; returns the summary dict on rank 0 (None elsewhere)."""
    c = _Comm(comm)
    show = c.rank == 0 and not o.quiet
    t0 = time.perf_counter()
    timings = {}  # phase -> seconds since the start when that phase ended (rank 0's clock)
    err = workdir = None
    if c.rank == 0:
        try:
            check_options(o)
            sources = list_sources(o)
            check_output(o)
            workdir = _make_workdir(o)
        except UserError as e:
            err, sources = str(e), None
    c.agree(c.bcast(err))
    sources, workdir = c.bcast((sources, workdir) if c.rank == 0 else None)
    owner = partition([s.size for s in sources], c.size)
    mine = [s for s, r in zip(sources, owner.tolist()) if r == c.rank]
    budget = o.memory_budget or default_memory_budget(c.size)
    counts = pretoken_counts.Counts(max(budget - FIXED_BYTES, MIN_TABLE_BYTES), workdir,
                                    prefix=f"counts-{c.rank}")
    raw = os.path.join(workdir, f"tokens-{c.rank}.bin")
    ids = os.path.join(workdir, f"pretokens-{c.rank}.bin")
    try:
        return _run(o, c, mine, counts, raw, ids, workdir, show, t0, timings)
    finally:
        counts.remove_runs()
        _unlink(raw)
        _unlink(ids)
        if c.rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(o, c, mine, counts, raw, ids, workdir, show, t0, timings):
    regex = re.compile(PATTERN)
    # 1-2. read and count (pass 1), keeping the pre-tokens' ids while the table has not spilled
    got, err = _local(_count, mine, regex, counts, show, ids, out=o.out)
    c.agree(err)
    metas, texts, n_pre, have_ids, n_binary, reading = got
    timings["read"] = reading            # time spent reading and decoding, within the pass
    timings["count"] = time.perf_counter() - t0
    # 3. vocabulary: merged in memory when every rank's table fits in rank 0's, else through
    # the sorted runs on disk
    sizes = c.allgather((len(counts), bool(counts.runs), len(metas), n_binary))
    spill = any(r for _, r, _, _ in sizes) or sum(n for n, _, _, _ in sizes) > counts.limit
    n_text, n_binary_all = sum(s[2] for s in sizes), sum(s[3] for s in sizes)
    err = tok = None
    if n_text == 0:
        err = (f"no text files in {o.data} ({n_binary_all} binary file(s) skipped)"
               if o.data is not None else "the default corpus found no text")
    c.agree(err)
    keys = counts.keys() if have_ids else None   # before a spill clears the table
    vocab = _vocabulary(o, c, counts, spill, keys)
    pretokens = c.bcast(vocab[0] if c.rank == 0 else None)
    counts.remove_runs()   # after the broadcast: rank 0 has read every rank's runs
    counts.clear()
    tok = Tokenizer(pretokens)
    timings["vocab"] = time.perf_counter() - t0
    # 4. encode (pass 2) into this rank's raw file
    dtype = token_dtype(tok.vocab_size)
    os.makedirs(workdir, exist_ok=True)
    if have_ids:   # from pass 1's ids
        table = token_table(keys, tok, dtype)
        del keys
        got, err = _local(_encode_ids, table, n_pre, tok, dtype, ids, raw, show, out=o.out)
        del table
    else:          # the count table spilled: pre-tokenize the text again
        got, err = _local(_encode, texts, metas, tok, regex, dtype, raw, show, out=o.out)
    _unlink(ids)
    c.agree(err)
    doc_tokens, fallback = got
    per_rank = c.gather((metas, doc_tokens, fallback, raw))
    timings["encode"] = time.perf_counter() - t0
    # 5. split and write (rank 0)
    summary = err = None
    if c.rank == 0:
        try:
            summary = _finish(o, tok, RawTokens([p[3] for p in per_rank], dtype),
                              np.concatenate([p[1] for p in per_rank]),
                              [m for p in per_rank for m in p[0]], n_binary_all,
                              fallback=sum(p[2] for p in per_rank),
                              pretokens=vocab[2], distinct=vocab[1])
        except UserError as e:
            err = str(e)
    c.agree(c.bcast(err))
    if c.rank == 0:
        timings["write"] = time.perf_counter() - t0
        summary["timings"] = timings
        summary["ranks"] = c.size
        summary["memory_budget"] = counts.limit * pretoken_counts.ENTRY_BYTES + FIXED_BYTES
        summary["spilled"] = spill
    return summary


def _make_workdir(o) -> str:
    """Rank 0's scratch directory beside the output, `.NAME.prepare-PID` (the count runs and
    the ranks' raw token files; removed at the end)."""
    if o.out == DEFAULT_OUT:
        os.makedirs(os.path.dirname(o.out), exist_ok=True)
    directory, name = os.path.split(os.path.abspath(o.out))
    path = os.path.join(directory, f".{name}.prepare-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {directory}: {_os_reason(e)}") from None
    return path


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _finish(o, tok, stream, doc_tokens, metas, n_binary, *, fallback, pretokens, distinct):
    """Split, describe and write the dataset; stream: the tokens (RawTokens)."""
    splits, split_docs = choose_split(doc_tokens, o.val_fraction)
    offsets = np.zeros(len(doc_tokens) + 1, dtype=np.int64)
    np.cumsum(doc_tokens, out=offsets[1:])
    n_bytes = sum(m[1] for m in metas)
    n_tokens = int(stream.size)
    text_tokens = n_tokens - len(doc_tokens)
    split_tokens = {s: int((r[:, 1] - r[:, 0]).sum()) for s, r in splits.items()}
    attrs = {
        "format": formats.DATASET,
        "format_version": FORMAT_VERSION,
        "created_by": f"mpitrain {_version()}",
        "corpus": "python-stdlib" if o.data is None else "directory",
        "data_dir": "" if o.data is None else os.path.abspath(o.data),
        "python_version": corpus.python_version(),
        "vocab_size": tok.vocab_size,
        "vocab_size_requested": o.vocab_size,
        "eod_id": tok.eod_id,
        "token_dtype": np.dtype(stream.dtype).name,
        "seq_len": o.seq_len,
        "val_fraction": float(o.val_fraction),
        "split_rule": ("n_val = max(1, round(documents * val_fraction)) documents: in each of "
                       "n_val consecutive blocks of documents, the one whose token count is "
                       "closest to val_fraction * tokens / n_val; one document: the last "
                       "ceil(tokens * val_fraction) tokens"),
        "files": len(metas),
        "binary_files_skipped": n_binary,
        "invalid_utf8_files": sum(1 for m in metas if m[3]),
        "replacement_characters": sum(m[3] for m in metas),
        "bytes": n_bytes,
        "documents": len(metas),
        "tokens": n_tokens,
        "tokens_sha256": tokens_sha256(stream),
        "text_tokens": text_tokens,
        "tokens_per_byte": text_tokens / n_bytes if n_bytes else 0.0,
        "distinct_pretokens": distinct,
        "pretokens": pretokens,
        "pretokens_byte_fallback": fallback,
        "byte_fallback_fraction": fallback / pretokens if pretokens else 0.0,
        "coverage": 1.0 - fallback / pretokens if pretokens else 1.0,
        "train_tokens": split_tokens["train"],
        "val_tokens": split_tokens["val"],
        "train_documents": split_docs["train"],
        "val_documents": split_docs["val"],
        "train_windows": max(0, (split_tokens["train"] - 1) // o.seq_len),
        "val_windows": max(0, (split_tokens["val"] - 1) // o.seq_len),
    }
    sources = {"name": [m[0] for m in metas], "size": [m[1] for m in metas],
               "sha256": [m[2] for m in metas], "replaced": [m[3] for m in metas]}
    _write_atomically(o, tok, dict(tokens=stream, doc_offsets=offsets, splits=splits,
                                   sources=sources, tokenizer=tok, attrs=attrs))
    summary = dict(attrs)
    summary["out"] = o.out
    summary["vocab_txt"] = formats.vocab_txt_path(o.out)
    summary["file_bytes"] = os.path.getsize(o.out)
    return summary


def _version():
    from mpitrain import __version__
    return __version__


def _os_reason(e: OSError) -> str:
    """A short reason for an OSError; HDF5's errors carry the errno inside a long message."""
    if isinstance(e.errno, int) and e.errno > 0:
        return os.strerror(e.errno)
    m = re.search(r"errno = (\d+)", str(e))
    if m:
        return os.strerror(int(m.group(1)))
    return " ".join(str(e).split())[:300]


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _write_atomically(o, tok, content):
    """Write the vocab.txt and the dataset together through mpitrain.atomic (both written
    before either is renamed into place); on any failure (disk full, SIGTERM, Ctrl-C) nothing
    is left behind."""
    out, vtxt = o.out, formats.vocab_txt_path(o.out)
    if os.path.exists(out) and not o.force:  # appeared while we worked
        raise UserError(f"output exists: {out} (use --force to replace it)")
    # SIGTERM (a job scheduler's kill) unwinds like Ctrl-C so the temporaries are removed;
    # only the main thread may set a handler.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    try:
        if out == DEFAULT_OUT:
            os.makedirs(os.path.dirname(out), exist_ok=True)
        with atomic.replacing_all([(vtxt, atomic.text),
                                   (out, atomic.hdf5(libver="earliest"))]) as (txt, h5):
            tok.write_txt(txt)
            write_dataset(h5, **content)
    except OSError as e:
        raise UserError(f"cannot write {out}: {_os_reason(e)}; nothing was written") from None
    except _Terminated:
        raise UserError("terminated; nothing was written") from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
