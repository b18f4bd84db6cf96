"""The dataset summary of `mpitrain inspect`: counts, coverage, frequent tokens, a sample."""
import numpy as np

from mpitrain.dataset import SPLITS, Dataset
from mpitrain.tokenizer import escape_token

FORMAT = "mpitrain-dataset"


def summarize(path, top=10):
    ds = Dataset.open(path)
    a = ds.attrs
    tok = ds.tokenizer
    streams = {s: ds.split_tokens(s) for s in SPLITS}
    counts = sum(np.bincount(streams[s], minlength=ds.vocab_size) for s in SPLITS)
    order = np.argsort(-counts, kind="stable")[:top]
    total = int(counts.sum())
    frequent = [{"id": int(i), "token": escape_token(tok.token_bytes(int(i))),
                 "count": int(counts[i]), "fraction": counts[i] / total if total else 0.0}
                for i in order if counts[i] > 0]
    sample_ids = streams["train"][:ds.seq_len + 1]
    return {
        "format": a.get("format"), "format_version": a.get("format_version"),
        "vocab_size": ds.vocab_size, "eod_id": tok.eod_id, "token_dtype": str(ds.dtype),
        "seq_len": ds.seq_len,
        "corpus": a.get("corpus"), "data_dir": a.get("data_dir"),
        "python_version": a.get("python_version"),
        "tokens": ds.num_tokens, "documents": ds.num_documents,
        "splits": {s: {"tokens": int(streams[s].size),
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


def format_summary(s):
    sp = s["splits"]
    lines = [
        f"dataset      format {s['format']} v{s['format_version']}, corpus "
        f"{s['corpus']}{' ' + s['data_dir'] if s['data_dir'] else ''}"
        f"{' (Python ' + s['python_version'] + ')' if s['corpus'] == 'python-stdlib' else ''}",
        f"vocabulary   {s['vocab_size']:,} ids (end-of-document id {s['eod_id']}), "
        f"tokens stored as {s['token_dtype']}",
        f"tokens       {s['tokens']:,} in {s['documents']:,} documents from {s['sources']:,} "
        f"sources ({s['bytes']:,} bytes, {s['tokens_per_byte']:.3f} tokens per byte)",
    ]
    for name in ("train", "val"):
        lines.append(f"  {name:<10} {sp[name]['tokens']:,} tokens, {sp[name]['documents']:,} "
                     f"documents, {sp[name]['windows']:,} windows of {s['seq_len']}+1")
    lines += [
        f"skipped      {s['binary_files_skipped']:,} binary files; "
        f"{s['invalid_utf8_files']:,} files with invalid UTF-8 "
        f"({s['replacement_characters']:,} characters replaced)",
        f"coverage     {s['coverage']:.2%} of pre-tokens in the vocabulary "
        f"({s['byte_fallback_fraction']:.2%} fell back to bytes)",
        "most frequent tokens:",
    ]
    for t in s["most_frequent_tokens"]:
        quoted = '"' + t["token"] + '"'  # already escaped (vocab.txt style)
        lines.append(f"  {t['id']:>7}  {t['count']:>12,}  {t['fraction']:6.2%}  {quoted}")
    smp = s["sample"]
    lines.append(f"sample       the first {smp['tokens']} tokens of the {smp['split']} stream, "
                 "decoded:")
    lines += ["  | " + l for l in smp["text"].split("\n")]
    return "\n".join(lines)
