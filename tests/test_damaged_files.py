"""Damaged files never give a traceback: a seeded byte-flip sweep over a small checkpoint, its
export and a small dataset, each damaged copy given to `infer --model`, `export`,
`train --resume FILE` (thread mode, tiny preset, --max-steps 1) and `train --dataset`, plus
Dataset.open. Every case must end with exit 0 or 2, and an exit 2 with exactly one line on
stderr (README, "bad input"; docs/DESIGN.md, "Files").

How the sweep runs: the parent (`sweep`) starts one worker process
(`python tests/test_damaged_files.py CASES.json START`) that runs the cases in order, in-process
through mpitrain.cli.main, and writes one JSON line per finished case. A case that makes HDF5
hang (a damaged global heap can) gets no line within the timeout: the parent kills the worker,
records the case as a hang and starts a new worker at the next case. A worker that dies without
a line (a crash) is recorded the same way. So the sweep costs one interpreter start, not one
per case.

A case: {"argv": [...], "src": file to damage, "copy": where the damaged copy goes (argv names
it), "offset": byte, "xor": 1..255, "cwd": directory to run in, "fresh": directory to empty
first (a run directory)}. A result: {"case": i, "code": exit status or null, "stderr": fd-2
text of the case, "exception": traceback text of anything main() raised, or null}.
"""
import json
import os
import select
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import REPO, write_corpus

# One case's limit: a normal case takes well under a second here (the train cases a few
# tenths); the margin is for a loaded 2-core machine.
TIMEOUT = 20.0
FLIPS = 24     # per file and command
SEED = 20261125


def data_extents(path):
    """[(start, end)] byte ranges of the contiguous datasets' raw data in an HDF5 file (the
    tensors and token arrays; a flip there is a checksum's job, not HDF5's)."""
    out = []

    def visit(_, obj):
        if isinstance(obj, h5py.Dataset) and obj.chunks is None:
            start, size = obj.id.get_offset(), obj.id.get_storage_size()
            if start is not None and size:
                out.append((start, start + size))
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return sorted(out)


def flip_offsets(path, count, seed, data_share=0.25):
    """`count` (offset, xor) pairs for `path`: about data_share of them anywhere in the file,
    the rest in bytes outside the raw data (superblock, object headers, B-trees, heaps), where
    a flip reaches HDF5's own structures. Deterministic in (file bytes, count, seed)."""
    size = os.path.getsize(path)
    meta = np.ones(size, bool)
    for a, b in data_extents(path):
        meta[a:b] = False
    meta_idx = np.flatnonzero(meta)
    rng = np.random.default_rng(seed)
    n_any = int(round(count * data_share))
    picks = np.concatenate([rng.integers(0, size, n_any),
                            rng.choice(meta_idx, count - n_any, replace=False)])
    xors = rng.integers(1, 256, count)
    return [(int(o), int(x)) for o, x in zip(picks, xors)]


def _damage(case):
    _flipped(case["src"], case["copy"], case["offset"], case["xor"])
    if case.get("fresh"):
        shutil.rmtree(case["fresh"], ignore_errors=True)


def _run_case(case, err_path):
    """Run one case with fds 1 and 2 pointed at files (HDF5 or C code may write there too)."""
    import traceback

    from mpitrain.cli import main

    _damage(case)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(null, 1), os.dup2(err, 2)
    code, exc = None, None
    cwd = os.getcwd()
    try:
        os.chdir(case["cwd"])
        if case["argv"][0] == "Dataset.open":
            code = _open_dataset(case["argv"][1])
        else:
            code = main(list(case["argv"]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - any escape is what the sweep looks for
        exc = traceback.format_exc()
    finally:
        os.chdir(cwd)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null, err):
            os.close(fd)
    with open(err_path, encoding="utf-8", errors="replace") as f:
        return {"code": code, "stderr": f.read(), "exception": exc}


def _open_dataset(path):
    """Dataset.open and a read of both splits, with the command line's contract: UserError ->
    its message as one stderr line and 2."""
    from mpitrain.dataset import Dataset
    from mpitrain.errors import UserError

    try:
        ds = Dataset.open(path)
        for split in ("train", "val"):
            ds.split_tokens(split)
    except UserError as e:
        print(f"mpitrain: error: {e}", file=sys.stderr)
        return 2
    return 0


def _worker(cases_path, start):
    with open(cases_path) as f:
        cases = json.load(f)
    out = os.fdopen(os.dup(1), "w")
    err_path = cases_path + f".stderr-{os.getpid()}"
    for i in range(start, len(cases)):
        result = _run_case(cases[i], err_path)
        result["case"] = i
        out.write(json.dumps(result) + "\n")
        out.flush()


def sweep(cases, workdir, timeout=20.0):
    """Run `cases` (list of dicts, see the module docstring). Returns (results, hangs): results
    a list of dicts in case order for the cases that ended; hangs a list of (case index, "hang"
    or "crash") for those that did not."""
    cases_path = os.path.join(workdir, "cases.json")
    with open(cases_path, "w") as f:
        json.dump(cases, f)
    results, hangs, start = [], [], 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the worker runs this file as a script: mpitrain must be importable without being installed
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    while start < len(cases):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), cases_path,
                                 str(start)], stdout=subprocess.PIPE, env=env)
        buf = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = select.select([proc.stdout], [], [], max(left, 0))[0] if left > 0 else []
            if not ready:
                proc.kill()
                proc.wait()
                hangs.append((start, "hang"))
                start += 1
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:  # the worker ended: all done, or it died inside a case
                proc.wait()
                if start < len(cases):
                    hangs.append((start, "crash"))
                    start += 1
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                results.append(json.loads(line))
                start = results[-1]["case"] + 1
                deadline = time.monotonic() + timeout
        proc.stdout.close()
    return results, hangs


# ----------------------------------------------------------------------------- the tests

WORDS = "the quick brown fox jumps over a lazy dog while models train on data 42 times".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small dataset, the step-1 tiny-preset checkpoint trained on it, and its export (step 1:
    its Adam moments are not all zeros, so damage there is not invisible)."""
    from mpitrain.cli import main

    root = tmp_path_factory.mktemp("damage")
    rng = np.random.default_rng(7)
    write_corpus(root / "text", {f"doc{i}.txt": " ".join(rng.choice(WORDS, 300)) + "\n"
                                 for i in range(6)})
    old = os.getcwd()
    os.chdir(root)
    try:
        assert main(["prepare", "--data", "text", "--out", "ds.h5", "--vocab-size", "300",
                     "--seq-len", "16", "--val-fraction", "0.2", "--quiet"]) == 0
        assert main(["train", "--dataset", "ds.h5", "--run-dir", "run", "--preset", "tiny",
                     "--max-steps", "1", "--threads", "3", "--quiet"]) == 0
        assert main(["export", "run/checkpoint_step_1.h5", "--out", "weights.h5"]) == 0
    finally:
        os.chdir(old)
    return {"root": str(root), "dataset": str(root / "ds.h5"),
            "checkpoint": str(root / "run" / "checkpoint_step_1.h5"),
            "weights": str(root / "weights.h5")}


def _commands(kind, copy, root):
    """(label, argv, run directory to empty first) for each command given a damaged file."""
    run = os.path.join(root, "resumed")
    train = ["train", "--run-dir", run, "--preset", "tiny", "--max-steps", "2",
             "--threads", "3", "--quiet"]
    if kind == "dataset":
        return [("Dataset.open", ["Dataset.open", copy], None),
                ("train --dataset", train + ["--dataset", copy], run)]
    cmds = [("infer --model", ["infer", "--model", copy, "--prompt", "the quick",
                               "--max-new-tokens", "4", "--temperature", "0"], None),
            ("export", ["export", copy, "--out", os.path.join(root, "out.h5"), "--force"],
             None)]
    if kind == "checkpoint":
        cmds.append(("train --resume", train + ["--dataset", os.path.join(root, "ds.h5"),
                                                "--resume", copy], run))
    return cmds


def _cases(files, kind):
    root = files["root"]
    copy = os.path.join(root, f"damaged_{kind}.h5")
    cases = []
    for offset, xor in flip_offsets(files[kind], FLIPS, SEED):
        for label, argv, fresh in _commands(kind, copy, root):
            cases.append({"label": label, "argv": argv, "src": files[kind], "copy": copy,
                          "offset": offset, "xor": xor, "cwd": root, "fresh": fresh})
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["checkpoint", "weights", "dataset"])
def test_byte_flips_end_in_exit_0_or_one_line_and_exit_2(files, kind, tmp_path):
    cases = _cases(files, kind)
    results, hangs = sweep(cases, str(tmp_path), TIMEOUT)
    failures = []
    for r in results:
        c = cases[r["case"]]
        where = f"{c['label']} with byte {c['offset']} ^ {c['xor']}"
        lines = r["stderr"].splitlines()
        if r["exception"]:
            failures.append(f"{where}: raised\n{r['exception']}")
        elif r["code"] not in (0, 2):
            failures.append(f"{where}: exit {r['code']}, stderr {r['stderr']!r}")
        elif r["code"] == 2 and len(lines) != 1:
            failures.append(f"{where}: exit 2 with {len(lines)} stderr lines {r['stderr']!r}")
    for i, what in hangs:
        c = cases[i]
        print(f"excluded: {c['label']} with byte {c['offset']} ^ {c['xor']}: {what}")
    assert not [h for h in hangs if h[1] == "crash"], hangs
    codes = [r["code"] for r in results]
    # the sweep must reach the damage paths, not only bytes HDF5 never reads (most of a
    # dataset's metadata bytes are unused space: few of its flips are noticed at all)
    assert codes.count(2) >= 4, codes
    assert not failures, "\n\n".join(failures)


def _flipped(src, dst, offset, xor):
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ xor]))


def test_find_resume_skips_a_newest_checkpoint_with_damaged_metadata(files, tmp_path, capsys):
    """Damage HDF5 meets in a checkpoint's structure (here the first flip that makes it raise
    inside h5py, e.g. KeyError 'incorrect metadata checksum') is a problem verify() reports
    and find_resume skips with a warning; load_checkpoint names it in a UserError."""
    from mpitrain import checkpoint as ckpt
    from mpitrain.errors import UserError

    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(files["checkpoint"], run / "checkpoint_step_1.h5")
    newest = run / "checkpoint_step_2.h5"
    for offset, xor in flip_offsets(files["checkpoint"], 200, SEED, data_share=0.0):
        _flipped(files["checkpoint"], newest, offset, xor)
        problems = ckpt.verify(newest)
        if problems and problems[0].startswith("its HDF5 structure is damaged"):
            break
    else:
        pytest.fail("no flip among 200 reached HDF5's own structures")
    assert ckpt.find_resume(run) == run / "checkpoint_step_1.h5"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipping damaged checkpoint" in err and str(newest) in err
    with pytest.raises(UserError, match="its HDF5 structure is damaged"):
        ckpt.load_checkpoint(newest)


def test_a_stored_pattern_that_no_longer_compiles_is_refused(tmp_path):
    from mpitrain.tokenizer import Tokenizer

    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        Tokenizer(["hello", " world"]).to_hdf5(f.create_group("vocab"))
        f["vocab"].attrs["pattern"] = " ?[^\\W"   # a damaged character class
    with h5py.File(path, "r") as f:   # the attributes' checksum sees it before anything compiles
        with pytest.raises(ValueError, match="attributes fail their checksum"):
            Tokenizer.from_hdf5(f["vocab"])
    with h5py.File(path, "a") as f:   # a version-1 vocabulary (no checksum): our patterns only
        f["vocab"].attrs["format_version"] = 1
        del f["vocab"].attrs["attrs_crc32"]
    with h5py.File(path, "r") as f:
        with pytest.raises(ValueError, match="pattern"):
            Tokenizer.from_hdf5(f["vocab"])


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))


@pytest.mark.parametrize("kind", ["dataset", "checkpoint"])
def test_an_attribute_of_a_kind_we_never_write_is_damage(files, kind, tmp_path, capsys):
    """A byte flip can turn a string attribute's datatype into a variable-length sequence, and
    reading that segfaulted inside h5py (found by a wider sweep of this module's flips). Such
    an attribute (here written on purpose, on a root string and on a tensor's checksum) makes
    the file damaged before anything reads it: one line and exit 2, or exit 1 for --verify."""
    from mpitrain.cli import main

    path = str(tmp_path / f"{kind}.h5")
    shutil.copyfile(files[kind], path)
    with h5py.File(path, "a") as f:
        obj = f if kind == "dataset" else f["params"][next(iter(f["params"]))]
        name = "format" if kind == "dataset" else "crc32"
        del obj.attrs[name]
        value = np.empty(1, dtype=object)
        value[0] = np.arange(3, dtype=np.int8)
        obj.attrs.create(name, value, dtype=h5py.vlen_dtype(np.int8))
    if kind == "dataset":   # its format attribute: not even the kind of file is known
        commands = [["inspect", path]]
    else:                   # the whole tree is shown, the attribute not read, the damage named
        assert main(["inspect", path, "--all"]) == 1
        out = capsys.readouterr().out
        assert "@crc32 = <not read: a datatype mpitrain never writes>" in out
        assert "DAMAGED: " in out and "crc32 has a datatype mpitrain never writes" in out
        commands = [["infer", "--model", path, "--prompt", "the"],
                    ["export", path, "--out", str(tmp_path / "out.h5")]]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "damaged" in err[0], (argv, err)
    assert main(["inspect", "--verify", path]) == 1
    assert "datatype mpitrain never writes" in capsys.readouterr().out
    if kind == "dataset":
        from mpitrain.dataset import Dataset
        from mpitrain.errors import UserError

        with pytest.raises(UserError, match="damaged"):
            Dataset.open(path)


@pytest.mark.slow
def test_a_tensor_name_that_does_not_decode(files, tmp_path, capsys):
    """h5py gives a name that is not UTF-8 as bytes; the checks name it instead of failing on
    it (found by the wider sweep: a flipped byte in a link name)."""
    from mpitrain.cli import main

    path = str(tmp_path / "names.h5")
    shutil.copyfile(files["checkpoint"], path)
    with h5py.File(path, "a") as f:
        f["params"].create_dataset(b"bad\xffname", data=np.zeros(2, np.float32))
    assert main(["inspect", "--verify", path]) == 1
    assert "unexpected: b'bad\\xffname'" in capsys.readouterr().out
    assert main(["infer", "--model", path, "--prompt", "the"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["inspect", path]) == 1
    assert "DAMAGED" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["tokens are a datatype", "no seq_len"])
def test_dataset_members_and_attributes_that_damage_changed(files, tmp_path, damage):
    """Two more of the wider sweep's finds: /tokens turned into a committed datatype, and the
    seq_len attribute's name changed, each refused as damage instead of a traceback."""
    from mpitrain.dataset import Dataset
    from mpitrain.errors import UserError

    path = str(tmp_path / "ds.h5")
    shutil.copyfile(files["dataset"], path)
    with h5py.File(path, "a") as f:
        if damage == "tokens are a datatype":
            del f["tokens"]
            f["tokens"] = np.dtype("uint16")
        else:
            del f.attrs["seq_len"]
    with pytest.raises(UserError, match="damaged"):
        Dataset.open(path)
