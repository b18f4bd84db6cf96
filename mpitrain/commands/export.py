"""`mpitrain export CKPT.h5 --out MODEL.h5`: a weights-only file for inference.

The output (format mpitrain-weights, docs/FORMATS.md) keeps the parameters, the configuration,
the step, the losses and the vocabulary, and drops the Adam moments: a third of the size. The
checkpoint is verified first; the output is written atomically.
"""
import os

from mpitrain.checkpoint import export_weights, load_checkpoint
from mpitrain.errors import UserError

NAME = "export"
HELP = "write a weights-only model file (for inference) from a checkpoint"


def add_arguments(p):
    p.add_argument("checkpoint", metavar="CKPT.h5", help="checkpoint (or export) to read")
    p.add_argument("--out", metavar="MODEL.h5", required=True, help="weights-only file to write")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")


def run(args):
    if os.path.exists(args.out) and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    out = export_weights(args.checkpoint, args.out)
    ck = load_checkpoint(out)
    print(f"wrote {out}: {sum(a.size for a in ck.params.values()):,} parameters at step "
          f"{ck.step}, {os.path.getsize(out):,} bytes")
    return 0
