"""`mpitrain infer --model CKPT.h5 --prompt TEXT`: continue a prompt, streaming token by token.

The checkpoint (or weights-only export) alone is enough: configuration and vocabulary travel
inside it. Generation runs in the C kernel's batched decoding with a key/value cache (one
sequence here; mpitrain/generate.py) and samples with mpitrain/sampler.py. `--interactive`
opens a prompt loop (readline history, Ctrl-D leaves, Ctrl-C stops a generation); the context
carries over from turn to turn until /reset.
"""
import codecs
import math
import os
import sys
import time

from mpitrain.errors import UserError

NAME = "infer"
HELP = "generate text from a checkpoint or weights-only export"

LIMITS = {"max_new_tokens": (1, 1_000_000), "top_k": (0, None), "threads": (1, 256),
          "seed": (0, 2 ** 63 - 1)}
MAX_TEMPERATURE = 100.0


def add_arguments(p):
    p.add_argument("--model", metavar="MODEL", required=True,
                   help="checkpoint (checkpoint_step_N.h5), weights-only export, or folder written "
                   "by export --format hf, to load"
                   "%(default).0s")
    p.add_argument("--prompt", metavar="TEXT", default=None,
                   help="text to continue; '-' reads it from standard input (one of --prompt "
                   "and --prompt-file is required unless --interactive)%(default).0s")
    p.add_argument("--prompt-file", metavar="FILE", default=None,
                   help="read the text to continue from FILE (UTF-8)%(default).0s")
    p.add_argument("--echo", action="store_true",
                   help="print the prompt before its continuation%(default).0s")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="generate N continuations of the prompt, each from the prompt alone; "
                   "sample i (from 0) uses seed S + i, so sample 0 is what a single run with "
                   "--seed S gives")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="tokens to generate (fewer if the end-of-document token comes first)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; 0 = greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample only among the K most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="sample only among the most likely tokens whose probabilities add up "
                   "to P (nucleus sampling; 1 = all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="kernel threads")
    p.add_argument("--interactive", action="store_true",
                   help="prompt loop: type text to continue it; /help lists the commands"
                   "%(default).0s")
    p.add_argument("--stats", action="store_true",
                   help="print tokens generated and tokens/s on stderr after each generation"
                   "%(default).0s")


def check_settings(max_new_tokens, temperature, top_k, top_p, vocab_size=None):
    """Raise UserError for an absurd setting (one line naming it)."""
    if not 1 <= max_new_tokens <= LIMITS["max_new_tokens"][1]:
        raise UserError(f"--max-new-tokens must be in [1, {LIMITS['max_new_tokens'][1]:,}], "
                        f"got {max_new_tokens}")
    if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
        raise UserError(f"--temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        bound = f"[0, {vocab_size}]" if vocab_size else ">= 0"
        raise UserError(f"--top-k must be in {bound}, got {top_k}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")


def _check_args(args):
    check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if not 1 <= args.threads <= LIMITS["threads"][1]:
        raise UserError(f"--threads must be in [1, {LIMITS['threads'][1]}], got {args.threads}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.seed + args.num_samples - 1 > LIMITS["seed"][1]:
        raise UserError(f"--seed + --num-samples - 1 must be at most {LIMITS['seed'][1]}")
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.interactive and args.num_samples != 1:
        raise UserError("--num-samples is for a single prompt, not --interactive")
    if args.prompt_file is not None or args.prompt == "-":
        args.prompt = read_prompt(args.prompt_file)
    if not args.interactive:
        if args.prompt is None:
            raise UserError("give --prompt TEXT, --prompt - (standard input) or --prompt-file "
                            "FILE (or --interactive)")
        if not args.prompt:
            raise UserError("the prompt is empty: give some text to continue")


def read_prompt(path):
    """The prompt from a file, or from standard input when path is None; UserError for a file
    that is missing or not UTF-8."""
    where = "standard input" if path is None else path
    try:
        if path is None:
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompt-file {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"--prompt-file {path}: is a directory") from None
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt from {where} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read the prompt from {where}: {e.strerror}") from None


def load(path, threads):
    """A one-sequence Decoder for a model file, or UserError with one line saying what is
    wrong."""
    from mpitrain import formats
    from mpitrain.generate import Decoder
    from mpitrain.hdf5_damage import file_format, is_damage

    try:
        fmt = file_format(path)
        if fmt == formats.DATASET:
            raise UserError(f"{path} is a dataset (made by prepare), not a model: give a "
                            "checkpoint from a run directory or an export")
    except Exception as e:  # missing, not HDF5 or damaged: load_checkpoint names the problem
        if not is_damage(e):
            raise
    return Decoder.from_file(path, threads=threads)


class Session:
    """Generation settings, the context and streaming output for the command and the loop."""

    def __init__(self, gen, args, out=sys.stdout):
        from mpitrain.sampler import Sampler

        self.gen, self.out = gen, out
        self.tok = gen.tokenizer
        self.max_new = args.max_new_tokens
        self.stats = args.stats
        self.sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)

    def set_sampler(self, **changes):
        from mpitrain.sampler import Sampler

        s = self.sampler
        kw = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
        kw.update(changes)
        check_settings(self.max_new, kw["temperature"], kw["top_k"], kw["top_p"],
                       self.gen.config.vocab_size)
        new = Sampler(**kw)
        if "seed" not in changes:
            new.rng = s.rng          # the random stream continues
        self.sampler = new

    def encode(self, text):
        ids = self.tok.encode(text)
        T = self.gen.max_context
        if ids.size > T:
            print(f"mpitrain: note: the prompt has {ids.size:,} tokens and the model's context "
                  f"holds {T}: using its last {T} tokens", file=sys.stderr, flush=True)
            ids = ids[-T:]
        return ids

    def run(self, ids):
        """Generate after ids (may be empty: continue the context), writing text as it comes.
        Returns the number of tokens generated."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        eod = self.tok.eod_id
        n, t0 = 0, time.perf_counter()
        try:
            for tid in self.gen.generate(ids, self.max_new, self.sampler, stop_ids={eod}):
                n += 1
                if tid == eod:
                    break
                self.out.write(decoder.decode(self.tok.token_bytes(tid)))
                self.out.flush()
        finally:
            self.out.write(decoder.decode(b"", final=True) + "\n")
            self.out.flush()
            if self.stats:
                dt = time.perf_counter() - t0
                print(f"mpitrain: {n} tokens in {dt:.2f} s ({n / dt if dt > 0 else 0:.1f} "
                      f"tokens/s), context {self.gen.length()}/{self.gen.max_context}, "
                      f"{self.gen.slides()} slides", file=sys.stderr, flush=True)
        return n


def run(args):
    try:
        return _run(args)
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly; stdout is pointed at /dev/null so the
        # interpreter's final flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args):
    _check_args(args)
    # generated text may hold any character (and U+FFFD for bytes that are not UTF-8): never
    # fail on a terminal whose encoding lacks one
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    gen = load(args.model, args.threads)
    check_settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   gen.config.vocab_size)
    session = Session(gen, args)
    if args.interactive:
        return interactive(session, args)
    try:
        ids = session.encode(args.prompt)
    except ValueError as e:   # a lone surrogate from the command line
        raise UserError(f"the prompt: {e}") from None
    if ids.size == 0:
        raise UserError("the prompt is empty: give some text to continue")
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"{'' if i == 0 else chr(10)}--- sample {i + 1} of {args.num_samples} "
                  f"(seed {args.seed + i}) ---", flush=True)
        gen.reset()
        session.set_sampler(seed=args.seed + i)
        if args.echo:
            session.out.write(args.prompt)
        session.run(ids)
    return 0


# ---- the interactive loop -------------------------------------------------------------------

COMMANDS_HELP = """commands:
  /temp T     temperature (0 = greedy)          /topk K   top-k (0 = off)
  /topp P     top-p in (0, 1] (1 = off)         /len N    tokens per answer
  /seed S     restart the random stream          /reset    empty the context
  /show       current settings and context       /help     this text
Ctrl-D (or /quit) leaves; Ctrl-C stops a generation. Text you type is appended to the context
(with the model's earlier output) and continued; /reset starts afresh."""


def _setting(session, cmd, value):
    """Apply one /command with its value (UserError for a bad one)."""
    conv = {"/temp": float, "/topp": float, "/topk": int, "/len": int, "/seed": int}[cmd]
    try:
        v = conv(value)
    except ValueError:
        raise UserError(f"{cmd} takes a number, got {value!r}") from None
    if cmd == "/len":
        check_settings(v, session.sampler.temperature, session.sampler.top_k,
                       session.sampler.top_p)
        session.max_new = v
    elif cmd == "/seed":
        if v < 0:
            raise UserError(f"/seed must be >= 0, got {v}")
        session.set_sampler(seed=v)
    else:
        key = {"/temp": "temperature", "/topk": "top_k", "/topp": "top_p"}[cmd]
        session.set_sampler(**{key: v})


def _show(session):
    s = session.sampler
    return (f"temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}, length "
            f"{session.max_new}, seed {s.seed}; context {session.gen.length()}/"
            f"{session.gen.max_context} tokens")


def _command(session, line):
    """Handle a /command line; returns False to leave the loop."""
    parts = line.split()
    cmd, rest = parts[0], parts[1:]
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/help":
        print(COMMANDS_HELP)
    elif cmd == "/reset":
        session.gen.reset()
        print("context emptied")
    elif cmd == "/show":
        print(_show(session))
    elif cmd in ("/temp", "/topk", "/topp", "/len", "/seed"):
        if len(rest) != 1:
            raise UserError(f"{cmd} takes one value (see /help)")
        _setting(session, cmd, rest[0])
        print(_show(session))
    else:
        raise UserError(f"unknown command {cmd} (see /help)")
    return True


def interactive(session, args):
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    gen = session.gen
    print(f"mpitrain infer: {args.model} ({gen.model.num_params:,} parameters, context "
          f"{gen.max_context} tokens). Type text to continue it; /help for commands, Ctrl-D "
          "to leave.", flush=True)
    if args.prompt:
        print(f">>> {args.prompt}")
        session.run(session.encode(args.prompt))
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        try:
            if line.startswith("/"):
                if not _command(session, line):
                    return 0
                continue
            if not line:
                continue
            session.run(session.encode(line))
        except UserError as e:
            print(f"mpitrain: error: {e}", file=sys.stderr, flush=True)
        except ValueError as e:      # text that cannot be encoded (a lone surrogate)
            print(f"mpitrain: error: {e}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print("[stopped]", flush=True)
