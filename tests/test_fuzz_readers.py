"""Fuzzing the readers with hypothesis: byte flips, truncations and root-attribute edits of a
real dataset, checkpoint and export (the `files` of test_damaged_files.py), each read by
`python -m mpitrain inspect --verify` in a subprocess under a timeout.

Every read must end with exit 1 (damage found: `FILE: DAMAGED: ...` lines) or 2 (one line:
verify's `FILE: error: ...` for a file that is not HDF5 at all, or `mpitrain: error: ...`), never a crash of the interpreter (a negative status), a traceback or
a hang -- or with exit 0 and `FILE: ok` when the change landed in bytes that do not matter
(HDF5 free space, padding), and then what the file holds must equal the original's: the
tensors of a checkpoint or export, the tokens, ranges and attributes of a dataset.

derandomize=True keeps CI reproducible; 12 examples a file kind and mutation (about 1 s each:
108 reads, about 2 minutes).
The seeded sweep of test_damaged_files.py gives the same files to infer, export and train.
"""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from test_damaged_files import files  # noqa: F401 (fixture)

KINDS = ("dataset", "checkpoint", "weights")
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
TIMEOUT = 60   # s: a read of these small files takes under 2 s


def verify(path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        return subprocess.run([sys.executable, "-m", "mpitrain", "inspect", "--verify", path],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"inspect --verify hung (> {TIMEOUT} s) on {path}")


def contents(kind, path):
    """What a sound file holds, as comparable plain values."""
    if kind == "dataset":
        from mpitrain.dataset import Dataset

        ds = Dataset.open(path)
        return (ds.attrs, {s: ds.split_tokens(s).tolist() for s in ("train", "val")},
                {s: r.tolist() for s, r in ds.ranges.items()}, ds.doc_offsets.tolist())
    from mpitrain.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    state = {s: {n: a.tobytes() for n, a in t.items()} for s, t in
             (ck.optimizer_state or {}).items()}
    return {n: a.tobytes() for n, a in ck.params.items()}, state, ck.step


def check(kind, original, copy):
    p = verify(copy)
    assert p.returncode >= 0, f"crashed with signal {-p.returncode}: {p.stderr[-2000:]}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-3000:]
    if p.returncode == 0:   # the change did not matter: the contents must be the original's
        assert p.stdout == f"{copy}: ok\n" and p.stderr == "", (p.stdout, p.stderr)
        assert contents(kind, copy) == contents(kind, original)
    elif p.returncode == 1:
        lines = p.stdout.splitlines()
        assert lines and all(line.startswith(f"{copy}: ") for line in lines), p.stdout
        assert "DAMAGED" in p.stdout or "not" in p.stdout, p.stdout
    else:   # verify's report of a file it cannot read at all (not HDF5): one line
        assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
        err = [line for line in p.stderr.splitlines() if line.strip()]
        out = [line for line in p.stdout.splitlines() if line.strip()]
        assert (len(err) == 1 and err[0].startswith("mpitrain: error: ") and not out) or \
            (len(out) == 1 and out[0].startswith(f"{copy}: error: ") and not err), \
            (p.stdout, p.stderr)


def _copy(files, kind):
    copy = os.path.join(files["root"], f"fuzz_{kind}.h5")
    shutil.copyfile(files[kind], copy)
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_a_flipped_byte_is_found_or_harmless(files, kind, where, xor):
    copy = _copy(files, kind)
    size = os.path.getsize(copy)
    with open(copy, "r+b") as f:
        f.seek(int(where * size))
        byte = f.read(1)[0]
        f.seek(int(where * size))
        f.write(bytes([byte ^ xor]))
    check(kind, files[kind], copy)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(keep=st.floats(0, 1, exclude_max=True))
def test_a_truncated_file_is_refused(files, kind, keep):
    copy = _copy(files, kind)
    with open(copy, "r+b") as f:
        f.truncate(int(keep * os.path.getsize(copy)))
    check(kind, files[kind], copy)


VALUES = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(allow_nan=True),
                   st.text(max_size=20), st.booleans(),
                   st.lists(st.integers(-100, 100), min_size=1, max_size=3))


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(pick=st.integers(0, 10**6), value=VALUES, group=st.booleans())
def test_an_edited_attribute_is_found_or_harmless(files, kind, pick, value, group):
    copy = _copy(files, kind)
    with h5py.File(copy, "r+") as f:
        target = f["vocab"] if group else f
        names = sorted(target.attrs)
        name = names[pick % len(names)]
        target.attrs[name] = np.array(value) if isinstance(value, list) else value
    check(kind, files[kind], copy)
