"""The dataset part of `mpitrain inspect`: the summary (counts, coverage, frequent tokens, a
sample), one training window (--sequence K), the vocabulary with token counts (--vocab) and
the --verify checks of a dataset.

Token counts are not stored in a dataset file (docs/FORMATS.md): the pre-token counts that
ordered the vocabulary are dropped after prepare. Every count shown here is computed from the
stored token stream (/tokens through the split ranges), so it counts ids as encoded, byte
fallbacks and end-of-document ids included.
"""
import numpy as np

from mpitrain import formats
from mpitrain.dataset import SPLITS, Dataset
from mpitrain.errors import UserError
from mpitrain.tokenizer import escape_token


def token_fields(b: bytes) -> dict:
    """A token as data (what --json prints): "token" its text, bytes that are not UTF-8 shown
    as U+FFFD, and "bytes" its exact bytes in hex. The text views print it escaped instead
    (vocab.txt style: shown(row))."""
    return {"token": b.decode("utf-8", errors="replace"), "bytes": b.hex()}


def shown(row: dict) -> str:
    """A token row's token, escaped and quoted as vocab.txt writes it."""
    return '"' + escape_token(bytes.fromhex(row["bytes"])) + '"'

COUNTS_NOTE = ("counts are occurrences in this file's token stream, computed now (the file "
               "stores no counts)")


def _counts(ds, streams):
    """{"train"|"val": [V] int64 occurrences of each id in that split's stream}, counted
    chunk by chunk (the streams are tokenstream.SplitStream: never read whole)."""
    out = {}
    for s in SPLITS:
        out[s] = np.zeros(ds.vocab_size, dtype=np.int64)
        for chunk in streams[s].chunks():
            out[s] += np.bincount(chunk, minlength=ds.vocab_size)
    return out


def summarize(path, top=10):
    ds = Dataset.open(path)
    a = ds.attrs
    tok = ds.tokenizer
    streams = {s: ds.stream(s) for s in SPLITS}
    per_split = _counts(ds, streams)
    counts = per_split["train"] + per_split["val"]
    order = np.argsort(-counts, kind="stable")[:10 if top is None else top]
    total = int(counts.sum())
    frequent = [{"id": int(i), **token_fields(tok.token_bytes(int(i))),
                 "count": int(counts[i]), "fraction": counts[i] / total if total else 0.0}
                for i in order if counts[i] > 0]
    sample_ids = _window_ids(streams["train"], ds.seq_len, 0)
    return {
        "format": a.get("format"), "format_version": a.get("format_version"),
        "vocab_size": ds.vocab_size, "eod_id": tok.eod_id, "token_dtype": str(ds.dtype),
        "seq_len": ds.seq_len,
        "corpus": a.get("corpus"), "data_dir": a.get("data_dir"),
        "python_version": a.get("python_version"),
        "tokens": ds.num_tokens, "documents": ds.num_documents,
        "splits": {s: {"tokens": len(streams[s]),
                       "documents": a.get(f"{s}_documents"),
                       "windows": ds.num_windows(s)} for s in SPLITS},
        "sources": a.get("files"), "bytes": a.get("bytes"),
        "binary_files_skipped": a.get("binary_files_skipped"),
        "invalid_utf8_files": a.get("invalid_utf8_files"),
        "replacement_characters": a.get("replacement_characters"),
        "tokens_per_byte": a.get("tokens_per_byte"),
        "coverage": a.get("coverage"),
        "byte_fallback_fraction": a.get("byte_fallback_fraction"),
        "most_frequent_tokens": frequent,
        "sample": {"split": "train", "first_token": 0, "tokens": int(sample_ids.size),
                   "ids": sample_ids.astype(int).tolist(), "text": tok.decode(sample_ids)},
    }


def _f(x, spec=","):
    """A root attribute formatted with `spec`, or "?" when the file lacks it (or holds
    something else than a number there), so a damaged or older file still prints."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "?"


def format_summary(s):
    sp = s["splits"]
    python = f" (Python {s['python_version']})" if s["corpus"] == "python-stdlib" else ""
    lines = [
        f"dataset      format {s['format']} v{s['format_version']}, corpus "
        f"{s['corpus']}{' ' + str(s['data_dir']) if s['data_dir'] else ''}{python}",
        f"vocabulary   {s['vocab_size']:,} ids (end-of-document id {s['eod_id']}), "
        f"tokens stored as {s['token_dtype']}",
        f"tokens       {s['tokens']:,} in {s['documents']:,} documents from {_f(s['sources'])} "
        f"sources ({_f(s['bytes'])} bytes, {_f(s['tokens_per_byte'], '.3f')} tokens per byte)",
    ]
    for name in ("train", "val"):
        lines.append(f"  {name:<10} {sp[name]['tokens']:,} tokens, {_f(sp[name]['documents'])} "
                     f"documents, {sp[name]['windows']:,} windows of {s['seq_len']}+1")
    lines += [
        f"skipped      {_f(s['binary_files_skipped'])} binary files; "
        f"{_f(s['invalid_utf8_files'])} files with invalid UTF-8 "
        f"({_f(s['replacement_characters'])} characters replaced)",
        f"coverage     {_f(s['coverage'], '.2%')} of pre-tokens in the vocabulary "
        f"({_f(s['byte_fallback_fraction'], '.2%')} fell back to bytes)",
        "most frequent tokens:",
    ]
    for t in s["most_frequent_tokens"]:
        lines.append(f"  {t['id']:>7}  {t['count']:>12,}  {t['fraction']:6.2%}  {shown(t)}")
    smp = s["sample"]
    lines.append(f"sample       the first {smp['tokens']} tokens of the {smp['split']} stream, "
                 "decoded:")
    lines += ["  | " + line for line in smp["text"].split("\n")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --sequence K

def _window_ids(stream, seq_len, k):
    """Training window k of a split's stream (tokenstream.SplitStream): seq_len + 1 tokens
    from k * seq_len (the model reads the first seq_len as inputs and predicts the last
    seq_len as targets)."""
    return stream.read(k * seq_len, k * seq_len + seq_len + 1)


def sequence(path, k, split="train"):
    """Window k of `split` as {"split", "window", "windows", "seq_len", "start", "ids",
    "tokens" (their text), "token_bytes" (hex), "text"}. UserError when k is out of range."""
    ds = Dataset.open(path)
    n = ds.num_windows(split)
    if not 0 <= k < n:
        raise UserError(f"--sequence {k} is out of range: the {split} split of {path} has {n} "
                        f"windows (0 to {n - 1}) of {ds.seq_len}+1 tokens" if n else
                        f"--sequence {k}: the {split} split of {path} has no windows")
    ids = _window_ids(ds.stream(split), ds.seq_len, k)
    tok = ds.tokenizer
    return {"file": path, "split": split, "window": k, "windows": n, "seq_len": ds.seq_len,
            "start": k * ds.seq_len, "ids": ids.astype(int).tolist(),
            "tokens": [token_fields(tok.token_bytes(int(i)))["token"] for i in ids],
            "token_bytes": [tok.token_bytes(int(i)).hex() for i in ids],
            "text": tok.decode(ids)}


def format_sequence(w):
    lines = [f"{w['file']}: {w['split']} window {w['window']} of {w['windows']}: tokens "
             f"{w['start']} to {w['start'] + len(w['ids']) - 1} of the {w['split']} stream "
             f"({w['seq_len']} inputs, targets shifted by one)", "ids:"]
    for i in range(0, len(w["ids"]), 16):
        lines.append("  " + " ".join(f"{x:>6}" for x in w["ids"][i:i + 16]))
    lines.append("tokens:")
    lines += [f"  {pos:>6} {i:>7}  {shown({'bytes': b})}"
              for pos, (i, b) in enumerate(zip(w["ids"], w["token_bytes"]))]
    lines.append("text:")
    lines += ["  | " + line for line in w["text"].split("\n")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- --vocab

def vocabulary(path, top=None):
    """Every id (or the `top` most frequent) with its token and its counts in the train and
    val streams, most frequent first (ties by id)."""
    ds = Dataset.open(path)
    per_split = _counts(ds, {s: ds.stream(s) for s in SPLITS})
    counts = per_split["train"] + per_split["val"]
    order = np.argsort(-counts, kind="stable")
    if top is not None:
        order = order[:top]
    tok = ds.tokenizer
    rows = [{"id": int(i), **token_fields(tok.token_bytes(int(i))), "count": int(counts[i]),
             "train": int(per_split["train"][i]), "val": int(per_split["val"][i])}
            for i in order]
    return {"file": path, "format": formats.DATASET, "vocab_size": ds.vocab_size,
            "eod_id": tok.eod_id,
            "order": "count", "counts": COUNTS_NOTE, "listed": len(rows),
            "total_tokens": int(counts.sum()), "tokens": rows}


def format_vocabulary(v):
    """One token a line, fixed columns (pager and grep friendly)."""
    head = [f"# {v['file']}: {v['listed']:,} of {v['vocab_size']:,} ids"
            + (", most frequent first" if v["order"] == "count" else ", in id order")]
    if v["counts"]:
        head.append(f"# {v['counts']}; {v['total_tokens']:,} tokens in all")
        head.append(f"# {'id':>7} {'count':>12} {'train':>12} {'val':>12}  token")
        body = [f"{r['id']:>9} {r['count']:>12} {r['train']:>12} {r['val']:>12}  {shown(r)}"
                for r in v["tokens"]]
    else:
        head.append(f"# {'id':>7}  token")
        body = [f"{r['id']:>9}  {shown(r)}" for r in v["tokens"]]
    return "\n".join(head + body)


# ----------------------------------------------------------------------------- --verify

def verify(path):
    """Problems of a file whose root format is mpitrain-dataset (empty list: sound): the layout
    checks of Dataset.open, every token id inside the vocabulary, and the root counts against
    the stored arrays. (The root attributes are under a checksum, format 2; the arrays are not.)"""
    try:
        ds = Dataset.open(path)
        streams = {s: ds.stream(s) for s in SPLITS}
    except UserError as e:  # its messages begin with the path, which the caller prints too
        msg = str(e)
        return [msg[len(path) + 2:] if msg.startswith(f"{path}: ") else msg]
    a, problems = ds.attrs, []
    found = {"tokens": ds.num_tokens, "documents": ds.num_documents}
    for s in SPLITS:
        found[f"{s}_tokens"] = len(streams[s])
        found[f"{s}_windows"] = ds.num_windows(s)
    for key, value in found.items():
        if a.get(key) != value:
            problems.append(f"root attribute {key} is {a.get(key)!r}, the stored arrays give "
                            f"{value}")
    return problems
