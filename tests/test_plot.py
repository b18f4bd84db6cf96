"""`mpitrain plot RUN_DIR --out loss.png` through the real command line: a PNG of the right
size whose curves were drawn from the run's metrics (checked through matplotlib's own reader
and the points plot_run reports), a clear one-line refusal when matplotlib is missing, and no
partial file on bad input."""
import json
import os

import pytest

from conftest import REPO, assert_user_error, run_cli
from test_generate_support import tiny_run_dir
from test_train_support import read_metrics, step_losses, tiny_dataset, val_losses  # noqa: F401

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_dataset, tmp_path_factory):  # noqa: F811
    return tiny_run_dir(tmp_path_factory.mktemp("plot"), tiny_dataset)


@pytest.mark.slow
def test_writes_png(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "loss.png"
    proc = run_cli("plot", finished_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(finished_run)
    n, nv = len(step_losses(records)), len(val_losses(records))
    assert proc.stdout.strip() == f"wrote {out}: {n} training steps, {nv} evaluations"
    assert out.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(str(out))
    assert img.shape[:2] == (450, 800)                   # 8 x 4.5 inches at 100 dpi
    assert img[..., :3].std() > 0.05                     # not a blank canvas
    assert sorted(os.listdir(tmp_path)) == ["loss.png"]  # no temporary file left


@pytest.mark.slow
def test_curves_are_the_metrics(finished_run):
    from mpitrain.plot import curves

    steps, losses, vsteps, vlosses = curves(finished_run)
    records = read_metrics(finished_run)
    assert dict(zip(steps, losses)) == step_losses(records)
    assert dict(zip(vsteps, vlosses)) == val_losses(records)


def test_missing_matplotlib(finished_run, tmp_path):
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib')\n")
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), REPO]))
    out = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "plot", finished_run, "--out", out],
                          env=env, capture_output=True, text=True, timeout=60)
    assert_user_error(proc, "plot needs matplotlib, which is not installed")
    assert not out.exists()


@pytest.mark.slow
def test_bad_input(tmp_path, finished_run):
    assert_user_error(run_cli("plot", tmp_path / "nope", "--out", tmp_path / "a.png"),
                      "no such run directory")
    assert_user_error(run_cli("plot", tmp_path, "--out", tmp_path / "a.png"), "no metrics.jsonl")
    assert_user_error(run_cli("plot", finished_run, "--out", tmp_path / "a.jpg"), ".png")
    assert_user_error(run_cli("plot", finished_run, "--out", tmp_path / "no" / "a.png"),
                      "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"event": "start", "time": 0}) + "\n")
    assert_user_error(run_cli("plot", empty, "--out", tmp_path / "a.png"), "no training steps")
    assert not any(p.name.endswith(".png") for p in tmp_path.iterdir())
