"""`mpitrain prepare`: text sources -> vocabulary + tokenized dataset file.

Pipeline (each rank handles a contiguous block of sources, balanced by bytes; rank 0 merges):
  1. read     bytes of each source; NUL -> binary (skipped), invalid UTF-8 -> U+FFFD (counted)
  2. count    pre-tokens (PATTERN) per document; each document is kept as an int32 array of
              indices into the rank's table of distinct pre-tokens (U entries)
  3. vocab    rank 0 sums the counts of all ranks and picks the vocabulary; broadcast
  4. encode   per distinct pre-token its id(s) (one id, or its UTF-8 bytes' ids); the
              document arrays expand through that table in NumPy; + end-of-document id
  5. write    rank 0 gathers the streams in rank order (= document order), splits, writes the
              file under a temporary name and renames it
The result depends only on the sources, so any number of ranks gives the same bytes.
"""
import itertools
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np

from mpitrain import atomic, corpus, formats
from mpitrain.dataset import FORMAT_VERSION, token_dtype, tokens_sha256, write_dataset
from mpitrain.errors import UserError
from mpitrain.progress import bar
from mpitrain.tokenizer import MAX_VOCAB_SIZE, PATTERN, Tokenizer, min_vocab_size

DEFAULT_OUT = os.path.join("hdf5_data", "default.h5")


@dataclass
class Options:
    data: str = None          # directory of text; None = the default standard-library corpus
    out: str = DEFAULT_OUT    # dataset file; the vocabulary goes beside it as NAME.vocab.txt
    vocab_size: int = 30000   # total ids: specials + 256 bytes + pre-tokens
    seq_len: int = 128        # training window length the dataset is meant for
    val_fraction: float = 0.01  # validation share (whole documents; see choose_split)
    force: bool = False       # replace an existing output
    quiet: bool = False       # no progress bars


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

    def gather_stream(self, local, dtype):
        """Rank-order concatenation of every rank's 1-D array, on rank 0."""
        if not self.comm:
            return local.astype(dtype, copy=False)
        local = np.ascontiguousarray(local, dtype=dtype)
        counts = self.comm.gather(local.size, root=0)
        out = np.empty(sum(counts), dtype=dtype) if self.rank == 0 else None
        from mpi4py import MPI
        mpi_t = MPI.UINT16_T if dtype == np.uint16 else MPI.UINT32_T
        self.comm.Gatherv([local, mpi_t], [out, counts, mpi_t] if self.rank == 0 else None, root=0)
        return out


def _local(fn, *args):
    """Run one phase's local work; a UserError becomes the rank's error message."""
    try:
        return fn(*args), None
    except UserError as e:
        return None, str(e)


def _read(sources, show):
    """[(name, bytes, sha256 hex, replacements, text or None if binary)] of this rank's
    sources."""
    out = []
    with bar(sum(s.size for s in sources), "read", "B", unit_scale=True, enabled=show) as b:
        for s in sources:
            data = corpus.read_source(s)
            text, replaced = corpus.decode(data)
            out.append((s.name, len(data), corpus.sha256_hex(data), replaced, text))
            b.update(s.size)
    return out


def _count(texts, regex, show):
    """Distinct pre-tokens (list, U, first-seen order), their counts [U] int64 and one int32
    array of indices into them per document."""
    index, docs = {}, []
    position = itertools.count()
    with bar(sum(len(t) for t in texts), "count", "char", unit_scale=True, enabled=show) as b:
        for text in texts:
            toks = regex.findall(text)
            # One C-level pass per token: a new pre-token gets the running position of its
            # first occurrence as its provisional id (setdefault's default), a known one its id.
            docs.append(np.fromiter(map(index.setdefault, toks, position), dtype=np.int64,
                                    count=len(toks)))
            b.update(len(text))
    # Provisional ids (first-occurrence positions) -> 0..U-1 in first-seen order.
    remap = np.zeros(next(position), dtype=np.int32)
    remap[np.fromiter(index.values(), dtype=np.int64, count=len(index))] = np.arange(
        len(index), dtype=np.int32)
    docs = [remap[d] for d in docs]
    del remap
    counts = np.bincount(np.concatenate(docs), minlength=len(index)) if docs else np.zeros(0)
    return list(index), counts.astype(np.int64), docs


def _encode(distinct, counts, docs, tok, show):
    """(stream of this rank's documents, token count per document, pre-tokens that fell back
    to bytes). Entry U of the table is the end-of-document id appended to every document."""
    u = len(distinct)
    get = tok.ids.get
    single = np.fromiter((get(t, -1) for t in distinct), dtype=np.int64, count=u)
    miss = np.flatnonzero(single < 0)
    miss_bytes = [distinct[i].encode("utf-8") for i in miss.tolist()]
    lengths = np.ones(u + 1, dtype=np.int64)
    lengths[miss] = [len(b) for b in miss_bytes]
    starts = np.cumsum(lengths) - lengths
    table = np.empty(int(lengths.sum()), dtype=np.int32)  # ids < 1,000,000
    hit = np.flatnonzero(single >= 0)
    table[starts[hit]] = single[hit]
    if len(miss):
        raw = np.frombuffer(b"".join(miss_bytes), dtype=np.uint8)
        table[expand_ranges(starts[miss], lengths[miss])] = raw.astype(np.int32) + tok.byte_offset
    table[starts[u]] = tok.eod_id
    eod = np.array([u], dtype=np.int32)
    with bar(len(docs), "encode", "doc", enabled=show) as b:
        parts, doc_tokens = [], np.empty(len(docs), dtype=np.int64)
        for k, d in enumerate(docs):
            d = np.concatenate([d, eod])
            ids = table[expand_ranges(starts[d], lengths[d])]
            parts.append(ids)
            doc_tokens[k] = ids.size
            b.update(1)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream, doc_tokens, int(counts[miss].sum())


def merge_counts(gathered):
    """Sum [(distinct, counts)] of all ranks into one {pre-token: count}."""
    total = dict(zip(gathered[0][0], gathered[0][1].tolist()))
    for distinct, counts in gathered[1:]:
        get = total.get
        for t, c in zip(distinct, counts.tolist()):
            total[t] = get(t, 0) + c
    return total


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
    err = None
    if c.rank == 0:
        try:
            check_options(o)
            sources = list_sources(o)
            check_output(o)
        except UserError as e:
            err, sources = str(e), None
    c.agree(c.bcast(err))
    sources = c.bcast(sources if c.rank == 0 else None)
    owner = partition([s.size for s in sources], c.size)
    mine = [s for s, r in zip(sources, owner.tolist()) if r == c.rank]

    # 1. read
    records, err = _local(_read, mine, show)
    c.agree(err)
    texts = [r[4] for r in records if r[4] is not None]
    meta = [r[:4] for r in records if r[4] is not None]
    n_binary = len(records) - len(texts)
    del records  # the texts live only in `texts` now, freed after counting
    timings["read"] = time.perf_counter() - t0
    # 2. count
    distinct, counts, docs = _count(texts, re.compile(PATTERN), show)
    del texts
    timings["count"] = time.perf_counter() - t0
    # 3. vocabulary
    gathered = c.gather((distinct, counts, meta, n_binary))
    err = tok = None
    if c.rank == 0:
        metas = [m for g in gathered for m in g[2]]
        n_binary_all = sum(g[3] for g in gathered)
        if not metas:
            err = (f"no text files in {o.data} ({n_binary_all} binary file(s) skipped)"
                   if o.data is not None else "the default corpus found no text")
        else:
            totals = merge_counts([(g[0], g[1]) for g in gathered])
            tok = Tokenizer.from_counts(totals, o.vocab_size)
    c.agree(c.bcast(err))
    if c.comm:
        pretokens = c.bcast(tok.pretokens if c.rank == 0 else None)
        tok = tok or Tokenizer(pretokens)
    timings["vocab"] = time.perf_counter() - t0
    # 4. encode
    stream, doc_tokens, fallback = _encode(distinct, counts, docs, tok, show)
    del docs
    dtype = token_dtype(tok.vocab_size)
    stream = c.gather_stream(stream, dtype)
    per_rank = c.gather((doc_tokens, fallback, int(counts.sum())))
    timings["encode"] = time.perf_counter() - t0
    # 5. split and write (rank 0)
    summary = err = None
    if c.rank == 0:
        try:
            doc_tokens = np.concatenate([p[0] for p in per_rank])
            summary = _finish(o, tok, stream, doc_tokens, metas, n_binary_all,
                              fallback=sum(p[1] for p in per_rank),
                              pretokens=sum(p[2] for p in per_rank),
                              distinct=len(totals))
        except UserError as e:
            err = str(e)
    c.agree(c.bcast(err))
    if c.rank == 0:
        timings["write"] = time.perf_counter() - t0
        summary["timings"] = timings
        summary["ranks"] = c.size
    return summary


def _finish(o, tok, stream, doc_tokens, metas, n_binary, *, fallback, pretokens, distinct):
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
