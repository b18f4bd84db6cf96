"""`python -m mpitrain` / `mpitrain`: argument parsing and the user-error contract.

A user mistake (bad option, missing file, ...) ends with one line on stderr and exit status 2.
Under mpirun only rank 0 prints it; every rank exits.
"""
import argparse
import importlib
import os
import sys

from mpitrain import launcher
from mpitrain.commands import COMMANDS, DEFAULT_COMMAND
from mpitrain.errors import UserError
from mpitrain.exits import Fault


def fail(message: str, code: int = 2) -> int:
    """Print one line on stderr (rank 0 only) and return the exit status."""
    if launcher.detect().rank == 0:
        print(f"mpitrain: error: {message}", file=sys.stderr, flush=True)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line instead of usage + message."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _modules():
    return {name: importlib.import_module(f"mpitrain.commands.{name}") for name in COMMANDS}


def build_parser(modules=None):
    modules = modules or _modules()
    parser = _Parser(
        prog="mpitrain",
        description="Train small GPT-style language models on a folder of text "
        "(MPI ranks under mpirun, threads otherwise).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, mod in modules.items():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = _modules()
    # `mpitrain --preset tiny` means `mpitrain train --preset tiny`; a first word that is not
    # an option names a command (`mpitrain trian` is refused as an invalid choice)
    if DEFAULT_COMMAND in modules and (not argv or (argv[0].startswith("-")
                                                    and argv[0] not in ("-h", "--help"))):
        argv.insert(0, DEFAULT_COMMAND)
    try:
        args = build_parser(modules).parse_args(argv)
        if args.command is None:
            build_parser(modules).print_help()
            return 2
        code = int(modules[args.command].run(args) or 0)
        sys.stdout.flush()  # a closed pipe must fail here, inside the try, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`mpitrain ... | head`): what it wanted was printed. Point stdout
        # at /dev/null so the interpreter's final flush cannot fail again, and end quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as e:
        return fail(str(e), e.exit_code)
    except Fault as e:   # stopped after saving what it could: one line, resumable
        if launcher.detect().rank == 0:
            print(f"mpitrain: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        return fail("interrupted", 130)
