"""`mpitrain ... | head`: a reader that goes away ends the command quietly (no BrokenPipeError
traceback, no "Exception ignored" from the interpreter's final flush)."""
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO


def _pipe(cmd, reader="head -1"):
    """Run `python -m mpitrain CMD | READER` in bash; (mpitrain's exit status, its stderr,
    what the reader printed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    script = (f'"{sys.executable}" -m mpitrain {cmd} 2>"$ERR" | {reader}; '
              'echo "status=${PIPESTATUS[0]}"')
    err = os.path.join(env.get("TMPDIR", "/tmp"), f"mpitrain-pipe-{os.getpid()}.err")
    env["ERR"] = err
    try:
        p = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                           timeout=120)
        with open(err) as fh:
            stderr = fh.read()
    finally:
        if os.path.exists(err):
            os.unlink(err)
    out, status = p.stdout.rsplit("status=", 1)
    return int(status), stderr, out


@pytest.mark.slow
def test_inspect_into_head_ends_quietly(tmp_path):
    # A tree of 4,000 datasets prints ~210 kB, far beyond a pipe's 64 kB buffer, so the write
    # certainly meets the closed pipe after head has read its line and left.
    path = tmp_path / "many.h5"
    with h5py.File(path, "w") as f:
        for i in range(4000):
            f.create_dataset(f"d{i:05d}", data=np.zeros(2, np.float32))
    status, stderr, out = _pipe(f'inspect "{path}"')
    assert stderr == ""
    assert status == 0
    assert out == f"{path}: no 'format' attribute (not a file mpitrain wrote), " \
        f"{path.stat().st_size:,} bytes on disk\n"
    # the whole output really is larger than a pipe holds
    status, stderr, out = _pipe(f'inspect "{path}"', reader="wc -c")
    assert (status, stderr) == (0, "") and int(out) > 128 * 1024
    # the same through --json (one print of a large string)
    status, stderr, out = _pipe(f'inspect "{path}" --json', reader="head -c 10")
    assert (status, stderr, out) == (0, "", "{\n \"file\":")


def test_help_into_a_reader_that_reads_nothing():
    # `true` exits without reading: the help text meets a closed pipe (or fits the buffer).
    status, stderr, _ = _pipe("inspect --help", reader="true")
    assert stderr == "" and status == 0
