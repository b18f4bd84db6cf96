"""`mpitrain prepare`: a folder of text (or the default standard-library corpus) becomes a
vocabulary and a tokenized HDF5 dataset. Under `mpirun -n N` the ranks share the work and
rank 0 writes the same bytes a single process would."""
import argparse
import sys
import traceback

from mpitrain import launcher
from mpitrain.errors import UserError
from mpitrain.prepare import DEFAULT_OUT, Options, parse_size, prepare

NAME = "prepare"
HELP = "turn a folder of text into a vocabulary and a tokenized HDF5 dataset"


def add_arguments(p):
    # default=SUPPRESS: the help states the default itself instead of "(default: None)"
    p.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                   help="folder of text files, read recursively in sorted path order "
                        "(default: the built-in corpus of this Python's standard-library "
                        "sources and pydoc topics)")
    p.add_argument("--out", metavar="FILE.h5", default=DEFAULT_OUT,
                   help="dataset file to write; the vocabulary is also written beside it as "
                        "FILE.vocab.txt")
    p.add_argument("--vocab-size", type=int, default=30000,
                   help="total vocabulary ids: 1 special + 256 bytes + most frequent pre-tokens "
                        "(258 .. 1,000,000)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="training window length the dataset is prepared for (stored; used to "
                        "count windows)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="validation share, in (0, 0.5]: round(documents * fraction) whole "
                        "documents (at least one) of about fraction * tokens in total; a single "
                        "document gives the tail of its tokens")
    p.add_argument("--memory-budget", metavar="SIZE", default="0",
                   help="memory each rank may use, like 800M or 4G: pre-token counts beyond it "
                        "are spilled to sorted files beside the output and merged (default: a "
                        "quarter of this machine's memory, shared by the ranks)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars and a one-line report")


def mpi_world():
    """COMM_WORLD when launched by mpirun with more than one rank, else None (no MPI import)."""
    if launcher.detect().size > 1:
        from mpi4py import MPI

        return MPI.COMM_WORLD
    return None


def run(args):
    opts = Options(data=getattr(args, "data", None), out=args.out, vocab_size=args.vocab_size,
                   seq_len=args.seq_len, val_fraction=args.val_fraction, force=args.force,
                   quiet=args.quiet, memory_budget=parse_size(args.memory_budget))
    comm = mpi_world()
    try:
        summary = prepare(opts, comm)
    except UserError:
        raise
    except BaseException:
        # A bug or an interrupt on one rank must end the whole job, not leave the others
        # waiting in a collective.
        if comm is not None and comm.Get_size() > 1:
            traceback.print_exc()
            sys.stderr.flush()
            comm.Abort(1)
        raise
    if summary is not None:
        print(report(summary, quiet=args.quiet), flush=True)
    return 0


def report(s, quiet=False) -> str:
    t = s["timings"]
    if quiet:
        return (f"wrote {s['out']}: {s['documents']:,} documents, {s['tokens']:,} tokens, "
                f"vocabulary {s['vocab_size']:,}, coverage {s['coverage']:.1%}, "
                f"{t['write']:.1f} s")
    lines = [
        f"corpus       {'standard library of Python ' + s['python_version'] if s['corpus'] == 'python-stdlib' else s['data_dir']}",
        f"files        {s['files']:,} text ({s['bytes']:,} bytes), {s['binary_files_skipped']:,} "
        f"binary skipped, {s['invalid_utf8_files']:,} with invalid UTF-8 "
        f"({s['replacement_characters']:,} characters replaced)",
        f"pre-tokens   {s['pretokens']:,} ({s['distinct_pretokens']:,} distinct)",
        f"vocabulary   {s['vocab_size']:,} ids"
        + (f" (fewer than the {s['vocab_size_requested']:,} requested: the corpus has no more "
           "distinct pre-tokens)" if s["vocab_size"] < s["vocab_size_requested"] else ""),
        f"coverage     {s['coverage']:.2%} of pre-tokens in the vocabulary "
        f"({s['pretokens_byte_fallback']:,} fell back to bytes, "
        f"{s['byte_fallback_fraction']:.2%})",
        f"tokens       {s['tokens']:,} ({s['text_tokens']:,} text + {s['documents']:,} "
        f"end-of-document), {s['tokens_per_byte']:.3f} tokens per byte",
        f"split        train {s['train_tokens']:,} tokens in {s['train_documents']:,} documents "
        f"({s['train_windows']:,} windows of {s['seq_len']}+1), val {s['val_tokens']:,} tokens "
        f"in {s['val_documents']:,} documents ({s['val_windows']:,} windows)",
        f"wrote        {s['out']} ({s['file_bytes']:,} bytes) and {s['vocab_txt']}",
        f"time         {t['write']:.2f} s (read {t['read']:.2f}, count "
        f"{t['count'] - t['read']:.2f}{', spilled to disk' if s.get('spilled') else ''}, vocabulary {t['vocab'] - t['count']:.2f}, encode "
        f"{t['encode'] - t['vocab']:.2f}, write {t['write'] - t['encode']:.2f}) on "
        f"{s['ranks']} rank(s)",
    ]
    return "\n".join(lines)
