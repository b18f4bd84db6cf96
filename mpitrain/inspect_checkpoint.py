"""The checkpoint part of `mpitrain inspect`: summary, verification and the difference of two.

summarize(path) / format_summary(s): what mpitrain.commands.inspect shows for a file whose root
`format` is mpitrain-checkpoint or mpitrain-weights: configuration, step, epoch, data position,
losses, parameter count and bytes, and every tensor's shape, count, mean, std, min, max and
NaN/Inf count (statistics in float64 over the finite values).
verify_files(paths) -> exit status: 0 every file sound, 1 a file damaged, 2 a file missing or
not one of mpitrain's files (a truncated file is damaged: it still starts with the HDF5
signature). A checkpoint or export is sound when mpitrain.checkpoint.verify finds nothing (root
attributes and every tensor against their CRC32, names and shapes against the manifest, the
vocabulary) and every tensor is finite: a NaN or Inf saved from a diverged run has valid
checksums, so it is looked for separately. A dataset is checked by inspect_dataset.verify.
compare(a, b) / format_compare(d): per-tensor difference of two files.
vocabulary(path, top): the vocabulary a checkpoint carries (ids and tokens; no counts).
"""
import json
import os

import h5py
import numpy as np

from mpitrain import formats
from mpitrain.checkpoint import TENSOR_GROUPS, verify
from mpitrain.errors import UserError
from mpitrain.inspect_dataset import token_fields
from mpitrain.inspect_dataset import verify as verify_dataset
from mpitrain.hdf5_damage import (DamagedFile, file_format, first_line, hdf5_failure, is_damage,
                                   open_ours)
from mpitrain.inspect_tree import COMPACT_MAX, dumps
from mpitrain.tokenizer import Tokenizer
from mpitrain.h5attrs import plain as _plain
from mpitrain.h5attrs import shown_name

FORMATS = (formats.CHECKPOINT, formats.WEIGHTS)
GROUPS = tuple(TENSOR_GROUPS.values())   # params, then the optimizer's state groups


def _json(attrs, key):
    try:
        return json.loads(_plain(attrs[key]))
    except (KeyError, ValueError, TypeError, OSError):
        return None


def tensor_stats(arr: np.ndarray) -> dict:
    """count, mean, std, min, max over the finite values (None when there are none), and
    the numbers of NaN and +-Inf entries."""
    a = np.asarray(arr, dtype=np.float64).reshape(-1)
    finite = np.isfinite(a)
    nan = int(np.isnan(a).sum())
    good = a[finite] if not finite.all() else a
    stats = {"count": int(a.size), "nan": nan, "inf": int(a.size - finite.sum()) - nan}
    if good.size:
        stats.update(mean=float(good.mean()), std=float(good.std()), min=float(good.min()),
                     max=float(good.max()))
    else:
        stats.update(mean=None, std=None, min=None, max=None)
    return stats


def _tensors(f, attrs, where) -> list:
    """(name, dataset) for the datasets of group /where: those the file's `param_names` lists
    first, in its order, then any others by name. On a damaged file a member that is not a
    dataset is left out (verify names it), and a name that does not decode shows as its
    bytes."""
    group = f[where] if where in f else None
    if not isinstance(group, h5py.Group):
        return []
    order = _json(attrs, "param_names")
    order = [n for n in order if isinstance(n, str)] if isinstance(order, list) else []
    present = list(group.keys())
    names = [n for n in order if n in present] + sorted(set(present) - set(order),
                                                        key=shown_name)
    return [(shown_name(n), group[n]) for n in names if isinstance(group[n], h5py.Dataset)]


def summarize(path, top=10):
    """Everything `inspect` reports about a checkpoint or export, as a JSON-ready dict.
    (`top` is the dataset summary's option; checkpoints list every tensor.)"""
    problems = verify(path, want_tokenizer=False)
    out = {"file_bytes": os.path.getsize(path), "problems": problems, "tensors": {}}
    with open_ours(path) as f:
        a = f.attrs
        out.update({
            "format": _plain(a.get("format")), "format_version": _plain(a.get("format_version")),
            "model_config": _json(a, "model_config"), "train_config": _json(a, "train_config"),
            "step": _plain(a.get("step")), "epoch": _plain(a.get("epoch")),
            "data_position": {"epoch": _plain(a.get("data_epoch")),
                              "index": _plain(a.get("data_index"))},
            "train_loss": _plain(a.get("train_loss")), "val_loss": _plain(a.get("val_loss")),
            "created_by": _json(a, "created_by"), "extra": _json(a, "extra"),
            "has_rng_state": _json(a, "rng_state") is not None,
            "vocab_size": _plain(f["vocab"].attrs.get("vocab_size")) if "vocab" in f else None,
        })
        for where in GROUPS:
            if where not in f:
                continue
            rows = []
            for n, ds in _tensors(f, a, where):
                try:
                    stats = tensor_stats(ds[()])
                except OSError:  # unreadable (truncated): shown, not fatal
                    stats = {"count": int(ds.size), "unreadable": True}
                rows.append({"name": n, "shape": list(ds.shape), "dtype": str(ds.dtype), **stats})
            out["tensors"][where] = rows
    params = out["tensors"].get("params", [])
    out["num_params"] = sum(r["count"] for r in params)
    out["param_bytes"] = sum(r["count"] * np.dtype(r["dtype"]).itemsize for r in params)
    return out


def _g(x, spec="11.4g"):
    return "-" if x is None else format(x, spec)


def _tensor_table(rows):
    width = max([len(r["name"]) for r in rows] + [6])
    head = (f"  {'tensor':<{width}}  {'shape':<14} {'count':>11} {'mean':>11} {'std':>11} "
            f"{'min':>11} {'max':>11} {'nan':>5} {'inf':>5}")
    lines = [head]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        if r.get("unreadable"):
            lines.append(f"  {r['name']:<{width}}  {shape:<14} {r['count']:>11,}  unreadable")
            continue
        lines.append(f"  {r['name']:<{width}}  {shape:<14} {r['count']:>11,} {_g(r['mean'])} "
                     f"{_g(r['std'])} {_g(r['min'])} {_g(r['max'])} {r['nan']:>5} {r['inf']:>5}")
    return lines


def format_summary(s, compact=False):
    """The summary as text; compact: a group of more than COMPACT_MAX tensors is one line
    instead of a table (`inspect --all` shows the tables)."""
    mc, tc, cb = s["model_config"] or {}, s["train_config"] or {}, s["created_by"] or {}
    loss = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    vocab = "" if s["vocab_size"] is None else f"; vocabulary {s['vocab_size']:,} ids"
    lines = [
        f"kind         {s['format']} v{s['format_version']}, {s['file_bytes']:,} bytes",
        "model        " + ", ".join(f"{k} {v}" for k, v in mc.items()),
        "training     " + ", ".join(f"{k} {v}" for k, v in tc.items()),
        f"step         {s['step']}  epoch {s['epoch']}  data position: epoch "
        f"{s['data_position']['epoch']}, index {s['data_position']['index']}",
        f"loss         train {loss(s['train_loss'])}  val {loss(s['val_loss'])}",
        f"parameters   {s['num_params']:,} ({s['param_bytes']:,} bytes){vocab}",
        f"written by   {cb.get('program', '?')} {cb.get('version', '?')} on {cb.get('host', '?')} "
        f"(PID {cb.get('pid', '?')}) at {cb.get('time_utc', '?')}",
        "checksums    " + ("all tensors and attributes verify" if not s["problems"] else
                           f"{len(s['problems'])} problem(s): " + "; ".join(s["problems"][:3])),
        "finite       " + _finite_line(s["tensors"]),
    ]
    folded = False
    for where, rows in s["tensors"].items():
        if compact and len(rows) > COMPACT_MAX:
            lines += ["", _group_line(where, rows)]
            folded = True
        else:
            lines += ["", f"/{where} ({len(rows)} tensors)"] + _tensor_table(rows)
    if folded:
        lines.append("(--all: per-tensor statistics)")
    return "\n".join(lines)


def _group_line(where, rows):
    """One line for a group of tensors: how many, their values and their range."""
    read = [r for r in rows if not r.get("unreadable")]
    lo = min((r["min"] for r in read if r["min"] is not None), default=None)
    hi = max((r["max"] for r in read if r["max"] is not None), default=None)
    unreadable = len(rows) - len(read)
    return (f"/{where} ({len(rows)} tensors): {sum(r['count'] for r in rows):,} values in "
            f"[{_g(lo, '.4g')}, {_g(hi, '.4g')}]"
            + (f", {unreadable} unreadable" if unreadable else ""))


def _finite_line(tensors):
    bad = [f"/{where}/{r['name']} ({r['nan']} NaN, {r['inf']} Inf)"
           for where, rows in tensors.items() for r in rows if r.get("nan") or r.get("inf")]
    total = sum(len(rows) for rows in tensors.values())
    if not bad:
        return f"all {total} tensors (unreadable ones aside)" if any(
            r.get("unreadable") for rows in tensors.values() for r in rows) else \
            f"all {total} tensors"
    return f"{len(bad)} of {total} tensors hold NaN/Inf: " + "; ".join(bad[:3]) + \
        (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")


def nonfinite(path):
    """One problem per tensor of /params and /optimizer/<state> holding NaN or Inf, naming it
    and the counts. Tensors that cannot be read are skipped (verify reports those)."""
    problems = []
    with open_ours(path) as f:
        for where in GROUPS:
            for n, ds in _tensors(f, f.attrs, where):
                if ds.dtype.kind != "f":
                    continue  # verify names a wrong dtype
                try:
                    a = ds[()]
                except OSError:
                    continue
                bad = ~np.isfinite(a)
                if bad.any():
                    nan = int(np.isnan(a).sum())
                    problems.append(f"/{where}/{n} is not finite: {nan} NaN and "
                                    f"{int(bad.sum()) - nan} Inf among {a.size:,} values")
    return problems


def verify_one(path):
    """(status, problems) for one file: 0 sound, 1 damaged, 2 missing or not one of ours."""
    try:
        return _verify_one(path)
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not hdf5_failure(e):
            raise
        return 1, [f"its HDF5 structure is damaged ({first_line(e)})"]


def _verify_one(path):
    if not os.path.isfile(path):
        return 2, ["no such file"]
    if not h5py.is_hdf5(path):
        return 2, ["not an HDF5 file"]
    try:
        fmt = file_format(path)
    except DamagedFile as e:
        return 1, [str(e)]
    except Exception as e:  # noqa: BLE001 - HDF5 reports damage under several types
        if not is_damage(e):
            raise
        fmt = None  # an HDF5 signature that will not open: truncated or damaged, verify says how
    else:
        if fmt == formats.DATASET:
            problems = verify_dataset(path)
            return (1 if problems else 0), problems
        if fmt not in FORMATS:
            return 2, [f"not a file mpitrain writes (format {fmt!r})"]
    problems = verify(path)
    if fmt is not None:
        try:
            problems += [q for q in nonfinite(path) if q not in problems]  # verify's own
        except OSError as e:  # damaged beyond what verify already reported
            problems.append(f"cannot read its tensors ({first_line(e)})")
    return (1 if problems else 0), problems


def verify_files(paths, out=print, as_json=False) -> int:
    """One line per file (or one JSON list); exit status 0 all sound, 1 some damaged, 2 some
    missing or not a checkpoint."""
    results = [(p, *verify_one(p)) for p in paths]
    if as_json:
        out(dumps([{"file": p, "status": st, "problems": pr} for p, st, pr in results]))
    else:
        for p, st, pr in results:
            label = {0: "ok", 1: "DAMAGED", 2: "error"}[st]
            out(f"{p}: {label}" + (f": {'; '.join(pr)}" if pr else ""))
    return max(st for _, st, _ in results)


def _open_for_compare(path):
    if not os.path.isfile(path):
        raise UserError(f"no such file: {path}")
    try:
        f = open_ours(path)
    except DamagedFile as e:
        raise UserError(f"{path} is damaged ({e})") from None
    except OSError:
        raise UserError(f"{path} is not a readable HDF5 file") from None
    if _plain(f.attrs.get("format")) not in FORMATS:
        f.close()
        raise UserError(f"{path} is not a checkpoint or weights file")
    return f


def compare(path_a, path_b) -> dict:
    """Per-tensor difference of two checkpoints/exports (A - B): for each tensor in either,
    max |A-B|, RMS of A-B, ||A-B|| / ||B|| and whether the bits are identical; plus the root
    attributes that differ (except created_by and meta_crc32)."""
    fa, fb = _open_for_compare(path_a), _open_for_compare(path_b)
    with fa, fb:
        skip = {"created_by", "meta_crc32"}
        keys = sorted((set(fa.attrs) | set(fb.attrs)) - skip)
        attrs = {k: [_plain(fa.attrs.get(k)), _plain(fb.attrs.get(k))] for k in keys
                 if _plain(fa.attrs.get(k)) != _plain(fb.attrs.get(k))}
        groups = {}
        for where in GROUPS:
            if where not in fa and where not in fb:
                continue
            ta, tb = dict(_tensors(fa, fa.attrs, where)), dict(_tensors(fb, fb.attrs, where))
            rows = []
            for n in list(ta) + [n for n in tb if n not in ta]:
                row = {"name": n}
                if n not in tb or n not in ta:
                    row["status"] = "only in A" if n in ta else "only in B"
                else:
                    x, y = ta[n][()], tb[n][()]
                    if x.shape != y.shape:
                        row["status"] = f"shape {list(x.shape)} vs {list(y.shape)}"
                    else:
                        d = x.astype(np.float64) - y.astype(np.float64)
                        norm_b = float(np.linalg.norm(y.astype(np.float64)))
                        row.update(status="identical" if x.tobytes() == y.tobytes() else "differ",
                                   max_abs=float(np.abs(d).max()) if d.size else 0.0,
                                   rms=float(np.sqrt(np.mean(d * d))) if d.size else 0.0,
                                   rel_l2=float(np.linalg.norm(d)) / norm_b if norm_b else None)
                rows.append(row)
            groups[where] = rows
    identical = not attrs and all(r["status"] == "identical" for rows in groups.values()
                                  for r in rows)
    return {"a": os.fspath(path_a), "b": os.fspath(path_b), "attrs": attrs, "tensors": groups,
            "identical": identical}


def format_compare(d):
    lines = [f"A = {d['a']}", f"B = {d['b']}"]
    if d["attrs"]:
        lines.append("attributes that differ:")
        for k, (a, b) in d["attrs"].items():
            lines.append(f"  {k}: A {str(a)[:60]}  B {str(b)[:60]}")
    for where, rows in d["tensors"].items():
        only = {r["status"] for r in rows}
        if len(only) == 1 and only <= {"only in A", "only in B"}:  # a whole group, e.g. vs export
            lines += ["", f"/{where}: {only.pop()} ({len(rows)} tensors)"]
            continue
        same = sum(r["status"] == "identical" for r in rows)
        lines += ["", f"/{where}: {same} of {len(rows)} tensors bit-identical"]
        width = max([len(r["name"]) for r in rows] + [6])
        lines.append(f"  {'tensor':<{width}}  {'status':<10} {'max |A-B|':>11} {'rms':>11} "
                     f"{'|A-B|/|B|':>11}")
        for r in rows:
            if "max_abs" in r:
                lines.append(f"  {r['name']:<{width}}  {r['status']:<10} {_g(r['max_abs'])} "
                             f"{_g(r['rms'])} {_g(r['rel_l2'])}")
            else:
                lines.append(f"  {r['name']:<{width}}  {r['status']}")
    lines += ["", "the files are identical (tensors and attributes)" if d["identical"]
              else "the files differ"]
    return "\n".join(lines)


def run_extra(args) -> int:
    """`mpitrain inspect --verify FILE...` and `mpitrain inspect A.h5 B.h5` (called by
    mpitrain.commands.inspect). Exit status: --verify as verify_files; a comparison 0 when the
    files are identical, 1 when they differ."""
    paths = [args.file] + list(args.others)
    if args.verify:
        return verify_files(paths, as_json=getattr(args, "json", False))
    if len(paths) != 2:
        raise UserError(f"inspect compares exactly two files, got {len(paths)} "
                        "(use --verify to check several)")
    d = compare(*paths)
    print(dumps(d) if getattr(args, "json", False) else format_compare(d))
    return 0 if d["identical"] else 1


def vocabulary(path, top=None):
    """The vocabulary stored in a checkpoint or export, in id order (the first `top` ids when
    given). Checkpoints hold no token stream, so there are no counts."""
    try:
        with open_ours(path) as f:
            if "vocab" not in f:
                raise UserError(f"{path} has no /vocab group (damaged); see inspect --verify")
            tok = Tokenizer.from_hdf5(f["vocab"], where=f"{path}: vocabulary")
            fmt = _plain(f.attrs.get("format"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the vocabulary of {path}: {first_line(e)}") from None
    n = tok.vocab_size if top is None else min(top, tok.vocab_size)
    rows = [{"id": i, **token_fields(tok.token_bytes(i)), "count": None}
            for i in range(n)]
    return {"file": path, "format": fmt, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
            "order": "id", "counts": None, "listed": n, "total_tokens": None, "tokens": rows}
