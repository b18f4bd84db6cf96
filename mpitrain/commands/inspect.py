"""`mpitrain inspect FILE.h5`: the HDF5 tree of any file, plus a summary for the kinds of file
mpitrain writes, chosen by the root `format` attribute. Focused views: --sequence K (one
training window of a dataset), --vocab (the vocabulary), --verify (soundness, exit 0/1/2),
and A.h5 B.h5 (per-tensor difference of two checkpoints)."""
import importlib
import os
import sys

import h5py

from mpitrain import formats
from mpitrain.errors import UserError
from mpitrain.hdf5_damage import DamagedFile, file_format, first_line, hdf5_failure, is_damage
from mpitrain.inspect_tree import describe, dumps, format_tree

NAME = "inspect"
HELP = "show an HDF5 file's structure and, for mpitrain files, a summary"

# Root `format` attribute -> module with summarize(path, top) -> dict and format_summary(dict)
# -> str. Add an entry here for each new file kind.
SUMMARIES = {
    formats.DATASET: "mpitrain.inspect_dataset",
    formats.CHECKPOINT: "mpitrain.inspect_checkpoint",
    formats.WEIGHTS: "mpitrain.inspect_checkpoint",
}


def add_arguments(p):
    p.add_argument("file", metavar="FILE.h5", help="dataset, checkpoint, export or any other "
                   "HDF5 file")
    p.add_argument("others", nargs="*", metavar="OTHER.h5", help="a second checkpoint or "
                   "export: print the per-tensor difference (exit 0 identical, 1 different); "
                   "with --verify, more files to check%(default).0s")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object instead of text (NaN and Inf "
                   "as the strings \"NaN\", \"Infinity\", \"-Infinity\")%(default).0s")
    p.add_argument("--top", type=int, default=None, metavar="N",
                   help="how many tokens to list: the most frequent in a dataset's summary "
                   "(10 when not given) and with --vocab (all when not given)%(default).0s")
    p.add_argument("--no-tree", action="store_true", help="print only the summary%(default).0s")
    p.add_argument("--all", action="store_true", help="list every object of the tree (by "
                   "default a checkpoint's groups of tensors are one line each)%(default).0s")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--verify", action="store_true", help="check soundness: for checkpoints "
                      "and exports structure, checksums and that every tensor is finite; for "
                      "datasets the layout, token ids and counts (exit 0 sound, 1 damaged, 2 "
                      "missing or not a file mpitrain writes)%(default).0s")
    view.add_argument("--sequence", type=int, metavar="K", help="dataset: decode training "
                      "window K (seq_len+1 tokens from K*seq_len of the --split stream): its "
                      "ids, tokens and text%(default).0s")
    view.add_argument("--vocab", action="store_true", help="list the vocabulary: for a dataset "
                      "every id with its token and its counts in the stored token stream, most "
                      "frequent first; for a checkpoint or export the ids and tokens it carries "
                      "(no counts), in id order%(default).0s")
    p.add_argument("--split", choices=("train", "val"), default="train",
                   help="the split --sequence reads")


def _file_format(path):
    """The root `format` attribute of an HDF5 file (None when absent); UserError when the file
    is missing, not HDF5 or will not open."""
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise UserError(f"not a file: {path}")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file")
    try:
        return file_format(path)
    except DamagedFile as e:
        raise UserError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not is_damage(e):
            raise
        raise UserError(f"cannot read {path}: {first_line(e)}") from None


def _tree_damage(node):
    """The first damage note in a describe() tree, or None."""
    if node.get("error"):
        return f"/{node['name'].strip('/')}: {node['error']}"
    for child in node.get("children", ()):
        found = _tree_damage(child)
        if found:
            return found
    return None


def inspect_file(path, top=None):
    """{"file", "format", "file_bytes", "tree", "summary", "damage"} for any HDF5 file (summary
    None when the format is not one mpitrain knows or the file is too damaged for it; damage
    None when everything read, else what failed first)."""
    fmt = _file_format(path)
    with h5py.File(path, "r") as f:
        tree = describe(f)  # marks damaged members instead of failing
    summary, damage = None, _tree_damage(tree)
    if fmt in SUMMARIES:
        try:
            summary = importlib.import_module(SUMMARIES[fmt]).summarize(path, top=top)
        except UserError as e:  # e.g. a dataset whose layout checks fail
            damage = str(e)
        except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
            if not is_damage(e):
                raise
            damage = f"the {fmt} summary cannot be read: {first_line(e)}"
    return {"file": path, "format": fmt, "file_bytes": os.path.getsize(path), "tree": tree,
            "summary": summary, "damage": damage}


def _dataset_view(args, fmt):
    """--sequence K and --vocab: one file, shown without tree or summary."""
    ds_mod = importlib.import_module("mpitrain.inspect_dataset")
    what = "--sequence" if args.sequence is not None else "--vocab"
    if args.others:
        raise UserError(f"{what} takes one file, got {1 + len(args.others)}")
    if args.sequence is not None:
        if fmt != formats.DATASET:
            kind = f"a {fmt} file" if fmt else "not a file mpitrain writes"
            raise UserError(f"--sequence needs a dataset (made by `mpitrain prepare`); "
                            f"{args.file} is {kind}")
        result = ds_mod.sequence(args.file, args.sequence, args.split)
        text = ds_mod.format_sequence
    elif fmt == formats.DATASET:
        result, text = ds_mod.vocabulary(args.file, args.top), ds_mod.format_vocabulary
    elif fmt in SUMMARIES:  # checkpoint or export: it carries the vocabulary it was trained on
        result = importlib.import_module(SUMMARIES[fmt]).vocabulary(args.file, args.top)
        text = ds_mod.format_vocabulary
    else:
        raise UserError(f"--vocab needs a dataset, checkpoint or export; {args.file} has "
                        f"format {fmt!r}" if fmt else f"--vocab needs a dataset, checkpoint or "
                        f"export; {args.file} has no 'format' attribute")
    print(dumps(result) if args.json else text(result))
    return 0


def _damaged_to_user_error(path, work):
    """work() with HDF5-level damage turned into one line (exit 2)."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not hdf5_failure(e):
            raise
        raise UserError(f"{path} is damaged ({first_line(e)}); `mpitrain inspect --verify "
                        f"{path}` says more") from None


def run(args):
    if args.top is not None and args.top < 0:
        raise UserError(f"--top must be >= 0, got {args.top}")
    # decoded text and tokens may hold any character: never fail on a terminal that lacks one
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    if args.verify or (args.others and args.sequence is None and not args.vocab):
        return _damaged_to_user_error(args.file, lambda: importlib.import_module(
            "mpitrain.inspect_checkpoint").run_extra(args))
    if args.sequence is not None or args.vocab:
        return _damaged_to_user_error(args.file,
                                      lambda: _dataset_view(args, _file_format(args.file)))
    info = inspect_file(args.file, top=args.top)
    status = 1 if info["damage"] else 0  # as --verify: the file opens but fails
    if args.no_tree:
        info.pop("tree")
    if args.json:
        print(dumps(info))
        return status
    size = f", {info['file_bytes']:,} bytes on disk"
    out = [f"{args.file}: format {info['format']!r}{size}" if info["format"] is not None
           else f"{args.file}: no 'format' attribute (not a file mpitrain wrote){size}"]
    compact = info["format"] in (formats.CHECKPOINT, formats.WEIGHTS) and not args.all
    if "tree" in info:
        out += ["", "tree:"] + format_tree(info["tree"], 1, compact)
    if info["summary"] is not None:
        summary_text = importlib.import_module(SUMMARIES[info["format"]]).format_summary
        out += ["", "summary:", summary_text(info["summary"], compact=True) if compact else
                summary_text(info["summary"])]
    if info["damage"]:
        out += ["", f"DAMAGED: {info['damage']} (exit status 1; `mpitrain inspect --verify` "
                "checks everything)"]
    print("\n".join(out))
    return status
