"""`mpitrain inspect FILE.h5`: the HDF5 tree of any file, plus a summary for the kinds of file
mpitrain writes, chosen by the root `format` attribute."""
import importlib
import json
import os

import h5py

from mpitrain.errors import UserError
from mpitrain.inspect_tree import describe, format_tree, plain

NAME = "inspect"
HELP = "show an HDF5 file's structure and, for mpitrain files, a summary"

# Root `format` attribute -> module with summarize(path, top) -> dict and format_summary(dict)
# -> str. Add an entry here for each new file kind.
SUMMARIES = {
    "mpitrain-dataset": "mpitrain.inspect_dataset",
    "mpitrain-checkpoint": "mpitrain.inspect_checkpoint",
    "mpitrain-weights": "mpitrain.inspect_checkpoint",
}


def add_arguments(p):
    p.add_argument("file", metavar="FILE.h5", help="dataset or other HDF5 file to inspect")
    p.add_argument("--json", action="store_true",
                   help="print tree and summary as one JSON object instead of text")
    p.add_argument("--top", type=int, default=10,
                   help="how many of the most frequent tokens to list")
    p.add_argument("--no-tree", action="store_true", help="print only the summary")
    p.add_argument("others", nargs="*", metavar="OTHER.h5", help="a second checkpoint or "
                   "export: print the per-tensor difference (exit 0 identical, 1 different)")
    p.add_argument("--verify", action="store_true", help="verify checkpoints/exports: structure "
                   "and checksums (exit 0 sound, 1 damaged, 2 missing or not a checkpoint)")


def inspect_file(path, top=10):
    """{"file", "format", "tree", "summary"} for any HDF5 file (summary None when the format is
    not one mpitrain knows)."""
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if not os.path.isfile(path):
        raise UserError(f"not a file: {path}")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path} is not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            fmt = plain(f.attrs.get("format"))
            tree = describe(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    summary = None
    if fmt in SUMMARIES:
        summary = importlib.import_module(SUMMARIES[fmt]).summarize(path, top=top)
    return {"file": path, "format": fmt, "tree": tree, "summary": summary}


def run(args):
    if args.verify or args.others:  # checkpoint verification / comparison
        return importlib.import_module("mpitrain.inspect_checkpoint").run_extra(args)
    if args.top < 0:
        raise UserError(f"--top must be >= 0, got {args.top}")
    info = inspect_file(args.file, top=args.top)
    if args.no_tree:
        info.pop("tree")
    if args.json:
        print(json.dumps(info, indent=1, ensure_ascii=False))
        return 0
    out = [f"{args.file}: format {info['format']!r}" if info["format"] is not None
           else f"{args.file}: no 'format' attribute (not a file mpitrain wrote)"]
    if "tree" in info:
        out += ["", "tree:"] + format_tree(info["tree"], 1)
    if info["summary"] is not None:
        summary_text = importlib.import_module(SUMMARIES[info["format"]]).format_summary
        out += ["", "summary:", summary_text(info["summary"])]
    print("\n".join(out))
    return 0
