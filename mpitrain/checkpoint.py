"""HDF5 checkpoints and weights-only exports: write atomically, read back verified.

Layout (docs/FORMATS.md, "Checkpoint"):
  /            attributes: format ("mpitrain-checkpoint" or "mpitrain-weights"), format_version,
               model_config and train_config (JSON), param_names and param_shapes (JSON, the
               manifest every load checks against), step, epoch, data_epoch, data_index,
               rng_state (JSON), train_loss and val_loss (absent when unknown), created_by (JSON),
               extra (JSON), checksum ("crc32"), meta_crc32 (CRC32 of the other root attributes)
  /params/<name>         float32, the parameter's shape (GPT-2 state_dict names)
  /optimizer/<state>/<name>  float32, one group per state tensor the optimizer declares
                         (mpitrain.optim.ADAMW.state: m, v)          (checkpoints only)
  /vocab                 the tokenizer (Tokenizer.to_hdf5)
Every dataset carries a `crc32` attribute: zlib.crc32 of its C-order bytes.

A file is written atomically (mpitrain/atomic.py): a crash never leaves a partial file under the
real name (at worst a hidden `.NAME.tmp-PID` that nothing reads).
"""
import io
import json
import math
import os
import platform
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from mpitrain import atomic, formats
from mpitrain.config import ModelConfig, TrainConfig
from mpitrain.errors import UserError
from mpitrain.optim import ADAMW
from mpitrain.hdf5_damage import DamagedFile, first_line, is_damage, open_ours, reading
from mpitrain.schedule import DataPosition
from mpitrain.h5attrs import plain as _plain
from mpitrain.h5attrs import shown_name

FORMAT_VERSION = 1
# Where each kind of tensor lives: the parameters, then one group per optimizer state tensor.
OPTIMIZER_GROUPS = {state: f"optimizer/{state}" for state in ADAMW.state}
TENSOR_GROUPS = {"params": "params", **OPTIMIZER_GROUPS}


@dataclass
class Checkpoint:
    """What load_checkpoint read (and verified). optimizer_state (state name -> param name ->
    array, the states mpitrain.optim.ADAMW declares) is None for a weights-only file or when
    load_checkpoint was asked not to load the optimizer."""

    path: str
    format: str
    model_config: ModelConfig
    train_config: TrainConfig
    param_names: list
    params: dict
    optimizer_state: dict = None
    step: int = 0
    epoch: int = 0
    data_position: DataPosition = DataPosition()
    rng_state: object = None
    train_loss: float = None
    val_loss: float = None
    created_by: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tokenizer: object = None


def crc32(arr: np.ndarray) -> int:
    """CRC32 of an array's bytes in C order (no copy when it is already contiguous)."""
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def nonfinite_problem(where: str, arr: np.ndarray):
    """The problem of a tensor holding NaN or Inf (naming it and the counts), or None. A
    checkpoint never holds one: save_checkpoint refuses, and a reader treats it as damaged."""
    finite = np.isfinite(arr)
    if finite.all():
        return None
    nan = int(np.isnan(arr).sum())
    return (f"{where} is not finite: {nan} NaN and {int(arr.size - finite.sum()) - nan} Inf "
            f"among {arr.size:,} values")


class NonFiniteState(ValueError):
    """save_checkpoint refused a state holding NaN or Inf (nothing was written)."""


def _meta_crc(attrs: dict) -> int:
    """CRC32 over the root attributes except meta_crc32, in a canonical JSON form."""
    canon = {k: _plain(v) for k, v in attrs.items() if k != "meta_crc32"}
    return zlib.crc32(json.dumps(canon, sort_keys=True).encode()) & 0xFFFFFFFF


def _as_dict(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def created_by() -> dict:
    """Who wrote a file: program, versions, host, PID, UTC time."""
    from mpitrain import __version__

    return {"program": "mpitrain", "version": __version__, "host": socket.gethostname(),
            "pid": os.getpid(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": platform.python_version(), "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}


def _write_h5(path, fill, in_memory=False) -> None:
    """Create or replace `path` atomically (mpitrain.atomic) with fill(h5file)'s content.

    in_memory: build the file in memory first and write its bytes with plain writes, which
    report a full disk as an OSError. HDF5 writing straight to a file that runs out of space
    fails inside its metadata cache as objects are released: each release prints an ignored
    exception, closing the file fails ("Can't destroy cache"), and the library's state after
    that has crashed the interpreter. Costs the file's size in memory while it is written; the
    saver asks for it when the free space is tight."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UserError(f"cannot write {path}: directory {directory} does not exist")
    if not in_memory:
        with atomic.replacing(path, atomic.hdf5(track_order=True)) as f:
            fill(f)
        return
    image = io.BytesIO()
    with h5py.File(image, "w", track_order=True) as f:
        fill(f)
    view = image.getbuffer()
    try:
        with atomic.replacing(path, atomic.binary) as out:
            for a in range(0, len(view), 64 << 20):
                out.write(view[a:a + (64 << 20)])
    finally:
        del view


def _write_tensor(group, name, arr):
    arr = np.ascontiguousarray(arr)
    if arr.dtype != np.float32:
        raise TypeError(f"tensor {name} must be float32, got {arr.dtype}")
    ds = group.create_dataset(name, data=arr, track_times=False)
    ds.attrs["crc32"] = np.uint32(crc32(arr))


def _checksum_unmarked(f):
    """Add crc32 to every dataset that has none yet (the vocabulary's, written by Tokenizer)."""
    def visit(_, obj):
        if isinstance(obj, h5py.Dataset) and "crc32" not in obj.attrs:
            obj.attrs["crc32"] = np.uint32(crc32(obj[()]))
    f.visititems(visit)


def _root_attrs(fmt, model_config, train_config, names, params, step, epoch, data_position,
                rng_state, train_loss, val_loss, extra, creator=None) -> dict:
    attrs = {
        "format": fmt, "format_version": np.int64(FORMAT_VERSION),
        "model_config": json.dumps(_as_dict(model_config), sort_keys=True),
        "train_config": json.dumps(_as_dict(train_config), sort_keys=True),
        "param_names": json.dumps(names),
        "param_shapes": json.dumps({n: list(np.shape(params[n])) for n in names}),
        "step": np.int64(step), "epoch": np.int64(epoch),
        "data_epoch": np.int64(data_position.epoch), "data_index": np.int64(data_position.index),
        "rng_state": json.dumps(rng_state), "created_by": json.dumps(creator or created_by()),
        "extra": json.dumps(extra or {}), "checksum": "crc32",
    }
    if train_loss is not None:
        attrs["train_loss"] = np.float64(train_loss)
    if val_loss is not None:
        attrs["val_loss"] = np.float64(val_loss)
    return attrs


def _set_attrs(f, attrs):
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["meta_crc32"] = np.uint32(_meta_crc(dict(f.attrs)))


def save_checkpoint(path, *, model_config, train_config, params, optimizer_state, step, epoch,
                    data_position, rng_state, train_loss, val_loss, tokenizer, extra=None,
                    in_memory=False):
    """Write a training checkpoint atomically (see the module docstring for the layout).

    params: dict name -> float32 array, in the model's param_names order (any array views
    work, e.g. into a flat buffer received over MPI); optimizer_state: dict state -> such a
    dict, one per state tensor of mpitrain.optim.ADAMW. rng_state and extra must be
    JSON-serialisable. tokenizer: anything with to_hdf5(h5py_group). in_memory: see
    _write_h5. A state holding NaN or Inf is refused (NonFiniteState) before anything is
    written; a non-finite loss is stored as unknown (absent).
    """
    names = list(params)
    if set(optimizer_state) != set(ADAMW.state):
        raise ValueError(f"optimizer state {sorted(optimizer_state)}: the optimizer keeps "
                         f"{list(ADAMW.state)}")
    for label in ADAMW.state:
        d = optimizer_state[label]
        if list(d) != names:
            raise ValueError(f"optimizer {label} names differ from the parameter names")
        for n in names:
            if np.shape(d[n]) != np.shape(params[n]):
                raise ValueError(f"optimizer {label}[{n}] has shape {np.shape(d[n])}, "
                                 f"parameter has {np.shape(params[n])}")
    for key, tensors in (("params", params),
                         *((state, optimizer_state[state]) for state in ADAMW.state)):
        for n in names:
            bad = nonfinite_problem(f"/{TENSOR_GROUPS[key]}/{n}", np.asarray(tensors[n]))
            if bad:
                raise NonFiniteState(f"the state of step {step} cannot be saved: {bad}")
    # A loss that is not finite is unknown: the attribute is left out, as when there is none.
    train_loss, val_loss = (x if x is not None and math.isfinite(x) else None
                            for x in (train_loss, val_loss))
    attrs = _root_attrs(formats.CHECKPOINT, model_config, train_config, names, params, step,
                        epoch, data_position, rng_state, train_loss, val_loss, extra)

    def fill(f):
        _set_attrs(f, attrs)
        for key, tensors in (("params", params),
                             *((state, optimizer_state[state]) for state in ADAMW.state)):
            g = f.require_group(TENSOR_GROUPS[key])
            for n in names:
                _write_tensor(g, n, tensors[n])
        tokenizer.to_hdf5(f.create_group("vocab"))
        _checksum_unmarked(f)

    _write_h5(path, fill, in_memory)


# ----------------------------------------------------------------------------- reading

def _json_attr(attrs, key, problems):
    try:
        return json.loads(_plain(attrs[key]))
    except KeyError:
        problems.append(f"root attribute {key!r} is missing")
    except (ValueError, TypeError):
        problems.append(f"root attribute {key!r} is not valid JSON")
    return None


def _read_tensors(f, key, names, shapes, into, problems, read=True):
    """Check group `key` holds exactly `names` with `shapes` (float32), verify each tensor's
    checksum, and return name -> array (read into `into[name]` when given, without a copy)."""
    where = TENSOR_GROUPS[key]
    if where not in f:
        problems.append(f"group /{where} is missing")
        return None
    group = f[where]
    if not isinstance(group, h5py.Group):
        problems.append(f"/{where} is not a group")
        return None
    found = set(group.keys())
    missing = [n for n in names if n not in found]
    # a damaged name may not decode: h5py gives it as bytes
    unexpected = sorted(shown_name(n) for n in found - set(names))
    if missing or unexpected:
        problems.append(f"/{where}: expected {len(names)} tensors, found {len(found)}"
                        + (f"; missing: {', '.join(missing[:5])}" if missing else "")
                        + (f"; unexpected: {', '.join(unexpected[:5])}" if unexpected else ""))
    out = {}
    for n in names:
        if n not in found:
            continue
        ds = group[n]
        want = tuple(shapes[n])
        if not isinstance(ds, h5py.Dataset):
            problems.append(f"/{where}/{n} is not a dataset")
            continue
        if ds.shape != want or ds.dtype != np.float32:
            problems.append(f"/{where}/{n}: expected float32 {list(want)}, found "
                            f"{ds.dtype} {list(ds.shape)}")
            continue
        if into is not None and tuple(np.shape(into[n])) != want:
            problems.append(f"/{where}/{n}: the model expects shape {list(np.shape(into[n]))}, "
                            f"the file holds {list(want)}")
            continue
        if not read:
            continue
        try:
            if into is not None:
                arr = into[n]
                ds.read_direct(arr)
            else:
                arr = ds[()]
        except (OSError, ValueError) as e:
            problems.append(f"/{where}/{n} cannot be read ({e}); the file is truncated or damaged")
            continue
        if "crc32" not in ds.attrs:
            problems.append(f"/{where}/{n} has no crc32 checksum")
        elif crc32(arr) != int(ds.attrs["crc32"]):
            problems.append(f"/{where}/{n} fails its checksum: the file is damaged")
        else:
            bad = nonfinite_problem(f"/{where}/{n}", arr)
            if bad:
                problems.append(bad)
        out[n] = arr
    return out


def _check(path, into=None, load_optimizer=True, want_tokenizer=True):
    """Open and verify a checkpoint or export. Returns (Checkpoint or None, problems)."""
    path = os.fspath(path)
    into = into or {}
    if not os.path.isfile(path):
        return None, [f"no such file: {path}"]
    try:
        f = open_ours(path)
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not is_damage(e):
            raise
        if isinstance(e, DamagedFile):
            return None, [str(e)]
        return None, ["not a readable HDF5 file (truncated, damaged or not HDF5)"]
    try:
        with f:
            return _check_file(f, path, into, load_optimizer, want_tokenizer)
    except Exception as e:  # noqa: BLE001 - metadata damage met anywhere in the reading
        if not is_damage(e):
            raise
        return None, [f"its HDF5 structure is damaged ({first_line(e)})"]


def _check_file(f, path, into, load_optimizer, want_tokenizer):
    """_check on the open file. h5py exceptions from damage propagate to _check."""
    problems = []
    attrs = f.attrs
    try:
        fmt = _plain(attrs.get("format"))
    except OSError:
        return None, ["its root attributes cannot be read (damaged)"]
    if fmt not in (formats.CHECKPOINT, formats.WEIGHTS):
        what = f"format {fmt!r}" if fmt else "no format attribute"
        return None, [f"not an mpitrain checkpoint or weights file ({what})"]
    version = _plain(attrs.get("format_version"))
    if version != FORMAT_VERSION:
        return None, [f"{fmt} format version {version} is not supported "
                      f"(this mpitrain reads version {FORMAT_VERSION})"]
    if "meta_crc32" not in attrs:
        problems.append("root attribute 'meta_crc32' is missing")
    elif _meta_crc(dict(attrs)) != int(attrs["meta_crc32"]):
        problems.append("root attributes fail their checksum: the file is damaged")
    names = _json_attr(attrs, "param_names", problems)
    shapes = _json_attr(attrs, "param_shapes", problems)
    mcfg = _json_attr(attrs, "model_config", problems)
    tcfg = _json_attr(attrs, "train_config", problems)
    if names is None or shapes is None or mcfg is None or tcfg is None:
        return None, problems
    if set(shapes) != set(names):
        return None, problems + ["param_shapes and param_names disagree"]
    if into.get("params") is not None and list(into["params"]) != names:
        exp, got = list(into["params"]), names
        diff = sorted(set(exp) ^ set(got))[:5]
        problems.append(f"parameter names: the model has {len(exp)}, the file {len(got)}"
                        + (f" (differing: {', '.join(diff)})" if diff else " (order differs)"))
        return None, problems
    try:
        model_config = ModelConfig.from_dict(mcfg)
        train_config = TrainConfig.from_dict(tcfg)
    except (KeyError, TypeError, ValueError) as e:
        return None, problems + [f"the stored configuration is invalid ({e})"]
    ck = Checkpoint(path=path, format=fmt, model_config=model_config,
                    train_config=train_config, param_names=names, params=None)
    ck.params = _read_tensors(f, "params", names, shapes, into.get("params"), problems)
    if fmt == formats.CHECKPOINT:
        # Without load_optimizer the state's names and shapes are checked, not read.
        state_into = into.get("optimizer") or {}
        ck.optimizer_state = {
            s: _read_tensors(f, s, names, shapes, state_into.get(s), problems, load_optimizer)
            for s in ADAMW.state}
        if not load_optimizer:
            ck.optimizer_state = None
    for key in ("step", "epoch", "data_epoch", "data_index"):
        if key not in attrs:
            problems.append(f"root attribute {key!r} is missing")
    if not problems:
        ck.step, ck.epoch = int(attrs["step"]), int(attrs["epoch"])
        ck.data_position = DataPosition(int(attrs["data_epoch"]), int(attrs["data_index"]))
        ck.rng_state = _json_attr(attrs, "rng_state", problems)
        ck.created_by = _json_attr(attrs, "created_by", problems) or {}
        ck.extra = _json_attr(attrs, "extra", problems) or {}
        ck.train_loss = float(attrs["train_loss"]) if "train_loss" in attrs else None
        ck.val_loss = float(attrs["val_loss"]) if "val_loss" in attrs else None
    problems.extend(_check_vocab(f, ck, want_tokenizer))
    return ck, problems


def _check_vocab(f, ck, want_tokenizer):
    if "vocab" not in f:
        return ["group /vocab (the vocabulary) is missing"]
    problems = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            try:
                ok = "crc32" in obj.attrs and crc32(obj[()]) == int(obj.attrs["crc32"])
            except OSError:
                ok = False
            if not ok:
                problems.append(f"/vocab/{name} fails its checksum: the file is damaged")
    f["vocab"].visititems(visit)
    if problems or not want_tokenizer:
        return problems
    from mpitrain.tokenizer import Tokenizer

    try:
        ck.tokenizer = Tokenizer.from_hdf5(f["vocab"], where="its vocabulary")
    except ValueError as e:
        return [str(e)]
    if ck.tokenizer.vocab_size != ck.model_config.vocab_size:
        return [f"its vocabulary has {ck.tokenizer.vocab_size} ids, the model "
                f"{ck.model_config.vocab_size}"]
    return []


def verify(path, want_tokenizer=True) -> list:
    """Every problem found in a checkpoint or weights file (empty list: the file is sound)."""
    _, problems = _check(path, want_tokenizer=want_tokenizer)
    return problems


def load_checkpoint(path, *, params_into=None, optimizer_into=None,
                    load_optimizer=True) -> Checkpoint:
    """Read and verify a checkpoint or weights-only export.

    params_into: optional dict name -> float32 array (e.g. Model.params), optimizer_into:
    optional dict state -> such a dict (e.g. Model.optimizer_state): tensors are read straight
    into them, no copy, and their shapes are checked against the file. load_optimizer=False
    skips reading the optimizer state (inference). Raises UserError naming the file and the
    first problem.
    """
    into = {"params": params_into, "optimizer": optimizer_into}
    ck, problems = _check(path, into, load_optimizer)
    if problems:
        more = f" (and {len(problems) - 1} more; see mpitrain inspect --verify)" \
            if len(problems) > 1 else ""
        raise UserError(f"{os.fspath(path)}: {problems[0]}{more}")
    return ck


def find_resume(run_dir):
    """The newest sound checkpoint_step_N.h5 in run_dir (a Path), or None when it holds no
    checkpoint at all. A damaged newer one is skipped with a warning on stderr. When every
    checkpoint there is damaged, UserError listing each and its first problem: a resume never
    silently starts the run over (and overwrites them as it goes)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = []
    for p in run_dir.iterdir():
        step = formats.checkpoint_step(p.name)
        if step is not None and p.is_file():
            found.append((step, p))
    damaged = []
    for _, p in sorted(found, reverse=True):
        problems = verify(p)
        if not problems:
            return p
        damaged.append(f"{p.name}: {problems[0]}")
        print(f"mpitrain: warning: skipping damaged checkpoint {p}: {problems[0]}",
              file=sys.stderr, flush=True)
    if damaged:
        raise UserError(f"--resume auto: none of the {len(damaged)} checkpoint(s) in {run_dir} "
                        f"is sound, so the run is not started over ({'; '.join(damaged)}); "
                        f"move them away to start afresh, or resume from a file elsewhere "
                        f"with --resume FILE")
    return None


def export_weights(src, out) -> Path:
    """Write a weights-only file (format mpitrain-weights: parameters, configuration, step,
    losses and vocabulary; no optimizer state) from a verified checkpoint or export."""
    ck = load_checkpoint(src, load_optimizer=False)
    if os.path.abspath(src) == os.path.abspath(out):
        raise UserError(f"export would overwrite its source {src}; choose another --out")
    creator = created_by()
    creator["source"] = {"path": os.fspath(src), "created_by": ck.created_by}
    attrs = _root_attrs(formats.WEIGHTS, ck.model_config, ck.train_config, ck.param_names,
                        ck.params, ck.step, ck.epoch, ck.data_position, ck.rng_state,
                        ck.train_loss, ck.val_loss, ck.extra, creator)

    def fill(f):
        _set_attrs(f, attrs)
        g = f.create_group("params")
        for n in ck.param_names:
            _write_tensor(g, n, ck.params[n])
        with reading(src), open_ours(src) as s:
            s.copy(s["vocab"], f, "vocab")  # checksums travel with the datasets

    _write_h5(out, fill)
    return Path(out)
