"""scripts/bench_kernel.py: its FLOP count and a seconds-long smoke run on the tiny preset.

The FLOPs per token (used for GFLOP/s and the SGEMM fraction) must equal the sum over the step's
matrix products that the GEMM floor times; for the seed model the issue quotes ~136 MFLOP.
"""
import json
import pathlib
import subprocess
import sys

import pytest

from mpitrain.config import ModelConfig

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))
import bench_kernel  # noqa: E402


@pytest.mark.parametrize("preset,batch,seq", [("seed", 32, 128), ("tiny", 4, 16), ("small", 3, 64)])
def test_flops_per_token_equals_the_step_gemms(preset, batch, seq):
    cfg = ModelConfig.preset(preset)
    gemms = bench_kernel.step_gemms(cfg, batch, seq)
    total = sum(2 * count * m * n * k for count, _, _, m, n, k in gemms)
    assert total == bench_kernel.flops_per_token(cfg, seq) * batch * seq


def test_seed_model_costs_about_136_mflop_per_token():
    assert bench_kernel.flops_per_token(ModelConfig.preset("seed"), 128) == 136_359_936


@pytest.mark.slow
def test_smoke_run_reports_both_sides(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--threads", "2",
            "--sgemm-size", "128", "--json", str(out)]
    p = subprocess.run([sys.executable, str(SCRIPTS / "bench_kernel.py"), *args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["ours"]["seconds"] > 0 and row["ours"]["sgemm_gflops"] > 0
    assert row["floor"]["seconds"] > 0
    assert "threads  2: ours" in p.stdout
    # torch installed: both models start near ln(vocab) from their own random initialisations,
    # a few tenths apart at most (a smoke check, not a numerical comparison)
    if row["torch"] is not None:
        assert row["torch"]["seconds"] > 0
        assert abs(row["torch"]["losses"][0] - row["ours"]["losses"][0]) < 0.5


def test_bad_options_exit_2_with_one_line():
    p = subprocess.run([sys.executable, str(SCRIPTS / "bench_kernel.py"), "--seq", "9999"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
