"""The run's plan: everything Node Zero and the workers must agree on before the first step.

Rank 0 makes it from the options, the dataset and (on resume) the checkpoint, and sends it to
every rank; the workers never read options or checkpoints themselves. Configuration precedence
(README, "Training"), lowest first:

  1. the preset (--preset)
  2. on resume, the checkpoint: the whole model architecture and the training configuration
  3. --set key=value and the dedicated options (--lr, --batch-size, ...); on resume only
     training fields may be set, the architecture is the checkpoint's
  always: vocab_size and seq_len come from the dataset (setting them is refused)
"""
import dataclasses
import glob
import os
from dataclasses import dataclass, fields

import numpy as np

from mpitrain import config, formats, schedule
from mpitrain.config import PRESETS, ModelConfig, TrainConfig
from mpitrain.errors import UserError
from mpitrain.trainer import memory, rundir

MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig))
FROM_DATASET = ("vocab_size", "seq_len")


@dataclass
class Plan:
    preset: str
    model_config: ModelConfig
    train_config: TrainConfig
    dataset_path: str
    run_dir: str
    num_windows: int             # training windows of the dataset at seq_len
    num_val_windows: int
    eval_ids: np.ndarray         # int64: the fixed validation windows of every evaluation
    total_steps: int             # the step the learning-rate schedule plans to end at
    start_step: int              # 0 for a fresh run, else the checkpoint's step
    stop_step: int               # this invocation's last step (--stop-at, else total_steps)
    position: schedule.DataPosition  # data position before step start_step + 1
    resume_path: str = None
    best_val_loss: float = None  # carried over from the checkpoint on resume
    threads_per_rank: int = 1
    quiet: bool = False
    on_save_error: str = "stop"  # a checkpoint write fails: "stop" (status 3) or "retry"
    progress: str = "lines"      # "bar" | "lines" | "none" (RunLog)
    log_every: int = 0           # a step line every N steps (0: every PRINT_EVERY seconds)
    warnings: tuple = ()         # said once when the run starts (Node Zero)
    extra: dict = None           # recorded in every checkpoint's `extra`: command, dataset


def parse_value(key: str, text: str):
    """`--set key=value`: the value read as the field's declared type and checked by its rule
    (mpitrain/config.py); UserError naming the key otherwise."""
    cls = ModelConfig if key in MODEL_KEYS else TrainConfig
    try:
        return config.parse(next(f for f in fields(cls) if f.name == key), text)
    except ValueError as e:
        raise UserError(f"--set {key}={text.strip()}: {e}") from None


def parse_sets(items: list) -> dict:
    """['key=value', ...] -> {key: typed value}; unknown or dataset-given keys are refused."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value")
        if key in FROM_DATASET:
            raise UserError(f"--set {key}: {key} comes from the dataset (prepare it with the "
                            f"{'--vocab-size' if key == 'vocab_size' else '--seq-len'} you want)")
        if key not in MODEL_KEYS and key not in TRAIN_KEYS:
            known = [k for k in MODEL_KEYS + TRAIN_KEYS if k not in FROM_DATASET]
            raise UserError(f"--set {key}: unknown key (known: {', '.join(known)})")
        if key in out:
            raise UserError(f"--set {key} given twice")
        out[key] = parse_value(key, value)
    return out


def check_overrides(overrides: dict) -> None:
    """Each value by its field's rule, before anything is read or prepared (--set values were
    checked when parsed; this catches the dedicated options)."""
    by_name = {f.name: f for cls in (ModelConfig, TrainConfig) for f in fields(cls)}
    for key, value in overrides.items():
        try:
            config.check(by_name[key], value)
        except ValueError as e:
            raise UserError(str(e)) from None


def resolve_configs(preset: str, overrides: dict, vocab_size: int, seq_len: int,
                    checkpoint=None):
    """(ModelConfig, TrainConfig) by the precedence in the module docstring.

    overrides: {field: value} from --set and the dedicated options (already merged)."""
    model_over = {k: v for k, v in overrides.items() if k in MODEL_KEYS}
    train_over = {k: v for k, v in overrides.items() if k in TRAIN_KEYS}
    if checkpoint is not None:
        if model_over:
            raise UserError(f"--set {next(iter(model_over))}: on resume the architecture comes "
                            f"from the checkpoint {checkpoint.path}")
        model = checkpoint.model_config
        train = checkpoint.train_config
        if model.vocab_size != vocab_size:
            raise UserError(f"checkpoint {checkpoint.path} has vocabulary size "
                            f"{model.vocab_size}, the dataset {vocab_size}: resume with the "
                            f"dataset it was trained on (--dataset)")
        if train.seq_len != seq_len:
            raise UserError(f"checkpoint {checkpoint.path} was trained with seq_len "
                            f"{train.seq_len}, the dataset has {seq_len}")
    else:
        model = ModelConfig(**PRESETS[preset]["model"])
        train = TrainConfig(**PRESETS[preset]["train"])
    try:
        model = dataclasses.replace(model, vocab_size=vocab_size, **model_over)
        train = dataclasses.replace(train, seq_len=seq_len, **train_over)
    except ValueError as e:
        raise UserError(str(e)) from None
    if seq_len > model.max_seq_len:
        raise UserError(f"the dataset's seq_len {seq_len} exceeds the model's max_seq_len "
                        f"{model.max_seq_len} (--set max_seq_len={seq_len}, or prepare with a "
                        f"shorter --seq-len)")
    return model, train


def resume_warnings(checkpoint, options: dict, model, train):
    """What the user should know about a resume: a --preset given whose architecture is not
    the checkpoint's (which wins), a worker count other than the checkpoint's (results then
    differ from an uninterrupted run at float rounding: the gradient sums group differently)."""
    if checkpoint is None:
        return
    preset = options["preset"]
    if options.get("preset_given"):
        ck_model = dataclasses.replace(checkpoint.model_config, vocab_size=model.vocab_size)
        own = dataclasses.replace(ModelConfig(**PRESETS[preset]["model"]),
                                  vocab_size=model.vocab_size)
        if own != ck_model:
            yield (f"--preset {preset} is overridden by the checkpoint "
                   f"{os.fspath(checkpoint.path)}: the model and training settings are the "
                   f"checkpoint's (--set changes training settings)")
    before = (checkpoint.extra or {}).get("workers")
    now = options.get("workers")
    if isinstance(before, int) and now is not None and before != now:
        yield (f"the checkpoint was written by a run with {before} worker(s), this one has "
               f"{now}: training continues exactly in order, but losses differ from an "
               f"uninterrupted run at float rounding (the gradient sums group differently)")


def dataset_summary(ds, path: str) -> dict:
    """The dataset as checkpoints record it (the exported model card shows it)."""
    a = ds.attrs
    out = {"path": os.path.abspath(path), "format_version": a.get("format_version"),
           "tokens": int(ds.num_tokens), "documents": int(ds.num_documents),
           "vocab_size": int(ds.vocab_size), "seq_len": int(ds.seq_len),
           "corpus": a.get("corpus")}
    if a.get("checksum") is not None:
        out["checksum"] = a.get("checksum")
    return out


def existing_checkpoints(run_dir: str) -> list:
    return sorted(glob.glob(os.path.join(run_dir, formats.CHECKPOINT_GLOB)))


def default_dataset(preset: str) -> str:
    """Where `train` without --dataset looks for (and, if missing, prepares) the default corpus:
    one file per preset, since the vocabulary size and seq_len are the preset's."""
    return os.path.join("hdf5_data", f"default_{preset}.h5")


def prepare_default(path: str, preset: str, quiet: bool) -> None:
    """Prepare the embedded default corpus with the preset's vocabulary size and seq_len
    (this process alone)."""
    from mpitrain import prepare

    cfg = PRESETS[preset]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if not quiet:
        print(f"mpitrain: {path} is missing: preparing the default corpus with the {preset} "
              f"preset's vocab_size {cfg['model']['vocab_size']} and seq_len "
              f"{cfg['train']['seq_len']}", flush=True)
    prepare.prepare(prepare.Options(data=None, out=path, vocab_size=cfg["model"]["vocab_size"],
                                    seq_len=cfg["train"]["seq_len"], quiet=quiet), comm=None)


def make_plan(options: dict):
    """Rank 0: resolve the run from the command's options. Returns (Plan, Checkpoint or None,
    Dataset). Raises UserError before anything is written (except a prepared default corpus).

    options: preset, dataset, run_dir, resume, stop_at, threads_per_rank, quiet, overrides."""
    from mpitrain.checkpoint import find_resume, load_checkpoint
    from mpitrain.dataset import Dataset

    preset = options["preset"]
    check_overrides(options["overrides"])
    run_dir = options["run_dir"] or os.path.join("runs", preset)
    rundir.check_run_dir(run_dir)
    dataset_path = options["dataset"] or default_dataset(preset)
    if options["dataset"] is None and not os.path.exists(dataset_path):
        prepare_default(dataset_path, preset, options["quiet"])
    if os.path.isdir(run_dir):   # refused at once when another run holds it
        rundir.lock(run_dir)
    ds = Dataset.open(dataset_path)

    checkpoint = None
    resume = options["resume"]
    if resume == "auto":
        found = find_resume(run_dir)
        checkpoint = load_checkpoint(found) if found is not None else None
    elif resume:
        checkpoint = load_checkpoint(resume)
    elif existing_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue "
                        f"that run, or choose another --run-dir")
    if checkpoint is not None and checkpoint.optimizer_state is None:
        raise UserError(f"{checkpoint.path} is a weights-only export (no optimizer state): "
                        f"resume needs a training checkpoint")
    if checkpoint is not None and hasattr(checkpoint.tokenizer, "pretokens") \
            and list(checkpoint.tokenizer.pretokens) != list(ds.tokenizer.pretokens):
        raise UserError(f"{checkpoint.path} was trained with another vocabulary than "
                        f"{dataset_path}: resume with the dataset it was trained on")

    model, train = resolve_configs(preset, options["overrides"], ds.vocab_size, ds.seq_len,
                                   checkpoint)
    num_windows = ds.num_windows("train", train.seq_len)
    num_val = ds.num_windows("val", train.seq_len)
    if num_windows < 1 or num_val < 1:
        raise UserError(f"{dataset_path}: the {'training' if num_windows < 1 else 'validation'} "
                        f"split holds no window of seq_len + 1 = {train.seq_len + 1} tokens")
    memory.check(model, train, options.get("workers_here", 1), options.get("thread_mode", True),
                 num_windows)
    total = schedule.total_steps(num_windows, train.batch_size, train.epochs, train.max_steps)
    start = checkpoint.step if checkpoint is not None else 0
    stop = total if not options["stop_at"] else min(options["stop_at"], total)
    if start >= stop:
        raise UserError(f"nothing to do: the run is at step {start} and ends at step {stop} "
                        f"(raise --max-steps or --epochs to continue it)")
    position = checkpoint.data_position if checkpoint is not None else schedule.DataPosition()
    if position.index >= num_windows:
        raise UserError(f"{checkpoint.path}: data position {position.index} is outside the "
                        f"dataset's {num_windows} training windows")
    best = (checkpoint.extra or {}).get("best_val_loss") if checkpoint is not None else None
    # Everything checked: hold the run directory (a second launch is refused from here on),
    # then look again -- a run started beside this one may have written its first checkpoint
    # after the check above -- and clear what dead writers left.
    rundir.lock(run_dir)
    if checkpoint is None and existing_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume auto to continue "
                        f"that run, or choose another --run-dir")
    rundir.remove_leftovers(run_dir)
    rundir.check_space(run_dir, model)
    rundir.write_vocab(run_dir, ds.tokenizer)
    plan = Plan(preset=preset, model_config=model, train_config=train,
                dataset_path=os.path.abspath(dataset_path), run_dir=os.path.abspath(run_dir),
                num_windows=num_windows, num_val_windows=num_val,
                eval_ids=schedule.eval_window_ids(num_val, train.eval_windows),
                total_steps=total, start_step=start, stop_step=stop, position=position,
                resume_path=None if checkpoint is None else os.fspath(checkpoint.path),
                best_val_loss=best, threads_per_rank=options["threads_per_rank"],
                quiet=options["quiet"], on_save_error=options.get("on_save_error", "stop"),
                progress=options.get("progress", "lines"),
                log_every=options.get("log_every") or 0,
                warnings=tuple(resume_warnings(checkpoint, options, model, train)),
                extra={"command": options.get("command"),
                       "dataset": dataset_summary(ds, dataset_path)})
    return plan, checkpoint, ds
