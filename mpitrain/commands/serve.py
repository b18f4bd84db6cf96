"""`mpitrain serve --model CKPT.h5`: an OpenAI-compatible completions service.

Loads a checkpoint or weights-only export (the files `infer` takes) into a Decoder with
--max-batch slots and answers HTTP (aiohttp, the optional `serve` extra): concurrent requests
are decoded together by one decode thread (mpitrain/serve/scheduler.py). SIGTERM/SIGINT stop
accepting connections, let running requests finish for up to --shutdown-timeout seconds, cancel
the rest and exit 0. docs/SERVING.md has the endpoints, limits and design.
"""
import os
import sys

from mpitrain.errors import UserError

NAME = "serve"
HELP = "serve a model over HTTP (OpenAI-compatible completions, batched decoding)"

LIMITS = {"port": (0, 65535), "threads": (1, 256), "max_batch": (1, 1024),
          "max_queue": (1, 1_000_000), "max_tokens": (1, 1_000_000),
          "shutdown_timeout": (0, 3600)}


def add_arguments(p):
    p.add_argument("--model", metavar="MODEL", required=True,
                   help="checkpoint (checkpoint_step_N.h5), weights-only export, or folder written "
                   "by export --format hf, to serve"
                   "%(default).0s")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0 exposes the service to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="kernel threads")
    p.add_argument("--max-batch", type=int, default=16, metavar="B",
                   help="sequences decoded together (decoder slots; each has its own "
                   "key/value cache)")
    p.add_argument("--max-queue", type=int, default=256, metavar="Q",
                   help="sequences waiting for a slot before requests are refused (HTTP 429)")
    p.add_argument("--max-tokens", type=int, default=4096, metavar="N",
                   help="largest max_tokens a request may ask for")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' (default: $MPITRAIN_API_KEY; "
                   "none: no authentication)%(default).0s")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds running requests may take to finish "
                   "before they are cancelled")


def _check_args(args):
    for name in ("port", "threads", "max_batch", "max_queue", "max_tokens", "shutdown_timeout"):
        lo, hi = LIMITS[name]
        v = getattr(args, name)
        if not lo <= v <= hi:
            raise UserError(f"--{name.replace('_', '-')} must be in [{lo}, {hi:,}], got {v}")


def load(path, threads, slots):
    """A Decoder with `slots` slots for a model file, or UserError naming what is wrong."""
    from mpitrain import formats
    from mpitrain.generate import Decoder
    from mpitrain.hdf5_damage import file_format, is_damage

    try:
        if file_format(path) == formats.DATASET:
            raise UserError(f"{path} is a dataset (made by prepare), not a model: give a "
                            "checkpoint from a run directory or an export")
    except Exception as e:  # missing, not HDF5 or damaged: load_checkpoint names the problem
        if not is_damage(e):
            raise
    return Decoder.from_file(path, threads=threads, slots=slots)


def run(args):
    from mpitrain.serve import missing

    problem = missing()
    if problem:
        raise UserError(problem)
    _check_args(args)
    import asyncio

    from aiohttp import web

    from mpitrain.serve.app import Service, build_app
    from mpitrain.serve.metrics import Metrics
    from mpitrain.serve.scheduler import Scheduler

    dec = load(args.model, args.threads, args.max_batch)
    metrics = Metrics()
    scheduler = Scheduler(dec, metrics, args.max_queue)
    svc = Service(dec, scheduler, metrics, args.model,
                  api_key=args.api_key or os.environ.get("MPITRAIN_API_KEY"),
                  max_tokens_cap=args.max_tokens)
    app = build_app(svc)

    async def start(app):
        scheduler.start(asyncio.get_running_loop())

    def listening(_aiohttp_message):      # called once the socket is bound
        auth = "bearer key required" if svc.api_key else "no authentication"
        print(f"mpitrain serve: {svc.model_id} ({dec.model.num_params:,} parameters, context "
              f"{dec.max_context}) on http://{args.host}:{args.port} (max batch "
              f"{args.max_batch}, queue {args.max_queue}, {auth}); Ctrl-C stops",
              file=sys.stderr, flush=True)

    async def stop(app):
        await asyncio.get_running_loop().run_in_executor(None, scheduler.close)

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    try:
        web.run_app(app, host=args.host, port=args.port, print=listening, access_log=None,
                    shutdown_timeout=args.shutdown_timeout, handler_cancellation=True)
    except web.GracefulExit:     # a second signal while shutting down: stop now
        pass
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    print("mpitrain serve: stopped", file=sys.stderr, flush=True)
    return 0
