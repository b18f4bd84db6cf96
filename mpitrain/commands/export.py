"""`mpitrain export CKPT.h5 --out OUT`: a model file for inference, mpitrain's or Hugging Face's.

--format h5 (default): a weights-only file (format mpitrain-weights, docs/FORMATS.md) that keeps
the parameters, the configuration, the step, the losses and the vocabulary, and drops the Adam
moments: a third of the size. Written atomically.
--format hf: a folder that Hugging Face transformers loads as GPT2LMHeadModel with its
tokenizer (mpitrain/hf_export.py; needs the optional packages: pip install 'mpitrain[hf]').
Written into a temporary folder beside OUT and renamed into place.
The checkpoint is verified first in both cases.
"""
import os

from mpitrain.errors import UserError

NAME = "export"
HELP = "write a model for inference from a checkpoint: weights-only .h5 or a Hugging Face folder"


def add_arguments(p):
    p.add_argument("checkpoint", metavar="CKPT.h5", help="checkpoint (or export) to read")
    p.add_argument("--out", metavar="OUT", required=True,
                   help="file to write (--format h5) or new directory (--format hf); required"
                   "%(default).0s")
    p.add_argument("--format", choices=("h5", "hf"), default="h5",
                   help="h5: mpitrain weights-only file; hf: Hugging Face transformers folder "
                   "(GPT-2 model, tokenizer, model card)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out if it exists (h5 only; an hf folder is never replaced)")


def run(args):
    if args.format == "hf":
        from mpitrain.hf_export import export_hf

        out = export_hf(args.checkpoint, args.out)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))} "
              f"({size:,} bytes)")
        return 0
    from mpitrain.checkpoint import export_weights, load_checkpoint

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    out = export_weights(args.checkpoint, args.out)
    ck = load_checkpoint(out)
    print(f"wrote {out}: {sum(a.size for a in ck.params.values()):,} parameters at step "
          f"{ck.step}, {os.path.getsize(out):,} bytes")
    return 0
