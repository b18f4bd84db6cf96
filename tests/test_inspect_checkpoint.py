"""`mpitrain inspect` on checkpoints: summary statistics, --verify exit codes, A-vs-B difference."""
import argparse
import json

import h5py
import numpy as np
import pytest

from mpitrain import inspect_checkpoint as ic
from mpitrain.checkpoint import export_weights, verify
from mpitrain.commands import inspect as inspect_cmd
from mpitrain.errors import UserError
from conftest import run_cli
from test_checkpoint import TOK, _flip_byte_in, _save, _tensors


def _run(argv):
    p = argparse.ArgumentParser()
    inspect_cmd.add_arguments(p)
    return inspect_cmd.run(p.parse_args(argv))


def test_tensor_stats_against_numpy():
    a = np.array([[1.0, -2.0, np.nan], [np.inf, 4.0, -np.inf]], np.float32)
    s = ic.tensor_stats(a)
    good = np.array([1.0, -2.0, 4.0])
    assert s["count"] == 6 and s["nan"] == 1 and s["inf"] == 2
    # float64 statistics of three exact values: equal up to an ulp or two
    assert s["mean"] == pytest.approx(good.mean(), rel=1e-15)
    assert s["std"] == pytest.approx(good.std(), rel=1e-15)
    assert (s["min"], s["max"]) == (-2.0, 4.0)
    assert ic.tensor_stats(np.full(3, np.nan, np.float32))["mean"] is None


def test_summary_of_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "checkpoint_step_7.h5"
    params, m, _ = _save(path)
    s = ic.summarize(str(path))
    assert s["format"] == "mpitrain-checkpoint" and s["step"] == 7 and s["epoch"] == 1
    assert s["data_position"] == {"epoch": 1, "index": 4}
    assert s["train_loss"] == 3.25 and s["val_loss"] is None and s["problems"] == []
    assert s["num_params"] == sum(a.size for a in params.values())
    assert s["param_bytes"] == 4 * s["num_params"]
    rows = {r["name"]: r for r in s["tensors"]["params"]}
    assert list(rows) == list(params)  # in the model's order
    ref = params["lm_head.weight"].astype(np.float64)
    r = rows["lm_head.weight"]
    assert r["shape"] == list(ref.shape) and r["count"] == ref.size
    # float64 sums of ~1e4 terms in whatever order: relative error <= n * 1.1e-16 ~ 1e-12
    assert r["mean"] == pytest.approx(ref.mean(), rel=1e-12)
    assert r["std"] == pytest.approx(ref.std(), rel=1e-12)
    assert (r["min"], r["max"]) == (ref.min(), ref.max())
    m_rows = {r["name"]: r for r in s["tensors"]["optimizer/m"]}
    assert m_rows["transformer.wpe.weight"]["max"] == float(m["transformer.wpe.weight"].max())
    # Through the inspect command: tree plus this summary.
    assert _run([str(path), "--no-tree"]) == 0
    out = capsys.readouterr().out
    assert "step         7  epoch 1  data position: epoch 1, index 4" in out
    assert "all tensors and attributes verify" in out
    assert "/optimizer/v (6 tensors)" in out and "lm_head.weight" in out
    json.dumps(s)  # JSON-ready


def test_verify_exit_codes(tmp_path, capsys):
    good, bad, trunc = tmp_path / "good.h5", tmp_path / "bad.h5", tmp_path / "trunc.h5"
    for p in (good, bad, trunc):
        _save(p)
    _flip_byte_in(bad, "optimizer/v/lm_head.weight")
    with open(trunc, "r+b") as fh:
        fh.truncate(trunc.stat().st_size // 2)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "someone-else"
    hollow = tmp_path / "hollow.h5"  # says it is a dataset, holds nothing: opens, fails
    with h5py.File(hollow, "w") as f:
        f.attrs["format"] = "mpitrain-dataset"
    assert _run(["--verify", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: ok\n"
    assert _run(["--verify", str(bad)]) == 1
    assert "DAMAGED: /optimizer/v/lm_head.weight fails its checksum" in capsys.readouterr().out
    assert _run(["--verify", str(trunc)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    for p in (text, other, tmp_path / "missing.h5"):
        assert _run(["--verify", str(p)]) == 2
    assert capsys.readouterr().out.count(": error: ") == 3
    assert _run(["--verify", str(hollow)]) == 1
    assert "DAMAGED: dataset format version None is not supported" in capsys.readouterr().out
    assert ic.verify_files([str(good), str(bad)], out=lambda _: None) == 1
    assert _run(["--verify", str(good), str(bad), str(trunc)]) == 1  # several files at once
    assert capsys.readouterr().out.count("DAMAGED") == 2
    exported = export_weights(good, tmp_path / "model.h5")
    assert ic.verify_files([str(exported)], out=lambda _: None) == 0
    assert _run(["--verify", "--json", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)[0]["status"] == 1


def test_compare_two_checkpoints(tmp_path, capsys):
    a, b, c = tmp_path / "a.h5", tmp_path / "b.h5", tmp_path / "c.h5"
    pa, _, _ = _save(a)
    _save(b)
    changed = _tensors(1)
    changed["lm_head.weight"] = changed["lm_head.weight"].copy()
    changed["lm_head.weight"][0, 0] += 0.5
    _save(c, params=changed, step=8)
    assert _run([str(a), str(b)]) == 0  # created_by differs, which compare ignores
    assert "the files are identical" in capsys.readouterr().out
    d = ic.compare(str(a), str(c))
    assert not d["identical"] and d["attrs"]["step"] == [7, 8]
    rows = {r["name"]: r for r in d["tensors"]["params"]}
    r = rows["lm_head.weight"]
    assert r["status"] == "differ"
    # the 0.5 was added in float32 to entries ~0.02: rounded to 6e-8 relative of the sum,
    # i.e. ~1e-7 of 0.5 (rel 1e-6); rms and rel_l2 add float64 sums on top (rel 1e-5)
    assert r["max_abs"] == pytest.approx(0.5, rel=1e-6)
    ref_b = changed["lm_head.weight"].astype(np.float64)
    assert r["rms"] == pytest.approx(np.sqrt(0.25 / ref_b.size), rel=1e-5)
    assert r["rel_l2"] == pytest.approx(0.5 / np.linalg.norm(ref_b), rel=1e-5)
    assert rows["transformer.wpe.weight"]["status"] == "identical"
    assert d["tensors"]["optimizer/m"][0]["status"] == "identical"
    assert _run([str(a), str(c)]) == 1
    with pytest.raises(UserError, match="compares exactly two files, got 3"):
        _run([str(a), str(b), str(c)])
    out = capsys.readouterr().out
    assert "/params: 5 of 6 tensors bit-identical" in out and "the files differ" in out
    # A checkpoint against its export: parameters identical, optimizer only in A.
    e = export_weights(a, tmp_path / "e.h5")
    d = ic.compare(str(a), str(e))
    assert all(r["status"] == "identical" for r in d["tensors"]["params"])
    assert {r["status"] for r in d["tensors"]["optimizer/m"]} == {"only in A"}


@pytest.mark.slow
def test_verify_finds_nan_and_inf_behind_valid_checksums(tmp_path, monkeypatch):
    # An older mpitrain saved a diverged run's NaN/Inf with correct CRC32s (save_checkpoint now
    # refuses them, so the test writes around the refusal): the finiteness checks see them.
    import h5py
    import mpitrain.checkpoint as ckpt

    path = tmp_path / "checkpoint_step_7.h5"
    params, m = _tensors(1), _tensors(2)
    params["lm_head.weight"][0, :2] = np.nan
    params["lm_head.weight"][1, 0] = np.inf
    m["transformer.wpe.weight"][3, 3] = -np.inf
    with monkeypatch.context() as mp:
        mp.setattr(ckpt, "nonfinite_problem", lambda where, arr: None)
        _save(path, params=params, m=m)
    with h5py.File(path, "r+") as f:
        f.attrs["train_loss"] = np.float64("nan")
        f.attrs["meta_crc32"] = np.uint32(ckpt._meta_crc(dict(f.attrs)))
    # checksums, names and shapes are all valid; only the values are not
    assert [q.split(" is not finite")[0] for q in verify(path)] == \
        ["/params/lm_head.weight", "/optimizer/m/transformer.wpe.weight"]
    p = run_cli("inspect", "--verify", path)
    assert p.returncode == 1 and p.stderr == ""
    n = params["lm_head.weight"].size
    assert f"/params/lm_head.weight is not finite: 2 NaN and 1 Inf among {n:,} values" in p.stdout
    assert "/optimizer/m/transformer.wpe.weight is not finite: 0 NaN and 1 Inf" in p.stdout
    assert "/params/transformer.wpe.weight" not in p.stdout
    p = run_cli("inspect", "--verify", "--json", path)
    (res,) = json.loads(p.stdout)
    assert p.returncode == 1 and res["status"] == 1 and len(res["problems"]) == 2
    # the summary counts them per tensor, and its JSON stays strict (the NaN loss as a string)
    p = run_cli("inspect", path, "--json", "--no-tree")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert s["summary"]["train_loss"] == "NaN" and s["file_bytes"] == path.stat().st_size
    row = {r["name"]: r for r in s["summary"]["tensors"]["params"]}["lm_head.weight"]
    good = params["lm_head.weight"][np.isfinite(params["lm_head.weight"])].astype(np.float64)
    # through JSON: float64 printed with repr round-trips; pytest.approx's default 1e-6 suffices
    assert (row["nan"], row["inf"]) == (2, 1) and row["mean"] == pytest.approx(good.mean())
    p = run_cli("inspect", path, "--no-tree")
    assert "finite       2 of 18 tensors hold NaN/Inf: /params/lm_head.weight (2 NaN, 1 Inf)" \
        in p.stdout
    # a finite checkpoint passes both checks
    _save(tmp_path / "fine.h5")
    p = run_cli("inspect", "--verify", tmp_path / "fine.h5")
    assert p.returncode == 0 and p.stdout.endswith(": ok\n")
    assert "finite       all 18 tensors" in run_cli("inspect", tmp_path / "fine.h5").stdout


@pytest.mark.slow
def test_checkpoint_inspect_through_the_command_line(tmp_path):
    # Everything inspect promises for a checkpoint, through the real CLI, text and JSON.
    path = tmp_path / "checkpoint_step_7.h5"
    params, _, _ = _save(path)
    p = run_cli("inspect", path)
    assert p.returncode == 0, p.stderr
    for fragment in (f"format 'mpitrain-checkpoint', {path.stat().st_size:,} bytes on disk",
                     "tree:", "params/", "lm_head.weight  [", "contiguous", "(stored ",
                     "@crc32 = ", "model        ", "d_model 8", "training     ", "seed 5",
                     "step         7  epoch 1  data position: epoch 1, index 4",
                     "loss         train 3.2500  val -", "parameters   ",
                     "/params (6 tensors)", "/optimizer/m (6 tensors)"):
        assert fragment in p.stdout, fragment
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    s = info["summary"]
    assert s["model_config"]["d_model"] == 8 and s["train_config"]["seed"] == 5
    assert (s["step"], s["epoch"], s["data_position"]) == (7, 1, {"epoch": 1, "index": 4})
    assert s["num_params"] == sum(a.size for a in params.values())
    assert s["param_bytes"] == 4 * s["num_params"]
    groups = {c["name"]: c for c in info["tree"]["children"]}
    wte = {c["name"]: c for c in groups["params"]["children"]}["transformer.wte.weight"]
    assert wte["stored_bytes"] == wte["bytes"] == params["transformer.wte.weight"].nbytes
    export = tmp_path / "model.h5"
    assert run_cli("export", path, "--out", export).returncode == 0
    d = json.loads(run_cli("inspect", path, export, "--json").stdout)
    assert all(r["status"] == "identical" for r in d["tensors"]["params"])


def test_default_tree_of_a_real_checkpoint_is_compact(tmp_path, capsys):
    # A 2-layer model has 29 tensors in each of params/, optimizer/m, optimizer/v: by default
    # each group is one line in the tree and in the summary; --all lists every tensor.
    from mpitrain.config import ModelConfig
    from mpitrain.model import Model

    mc = ModelConfig.preset("tiny", vocab_size=TOK.vocab_size)
    model = Model(mc, seed=0, threads=1)
    params = {n: np.array(model.params[n]) for n in model.param_names}
    zeros = {n: np.zeros_like(a) for n, a in params.items()}
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path, params=params, m=zeros, v=dict(zeros), model_config=mc)
    n = len(params)
    assert n > 8
    assert _run([str(path)]) == 0
    compact = capsys.readouterr().out
    assert f"    params/  {n} datasets (float32), " in compact
    assert f"      m/  {n} datasets (float32), " in compact
    assert "lm_head.weight" not in compact and "@crc32" not in compact.split("vocab/")[0]
    assert f"/params ({n} tensors): {sum(a.size for a in params.values()):,} values in [" \
        in compact
    assert "/optimizer/v ({n} tensors): {:,} values in [0, 0]".format(
        sum(a.size for a in params.values()), n=n) in compact
    assert _run([str(path), "--all"]) == 0
    full = capsys.readouterr().out
    for name in params:
        assert f"      {name}  [" in full and f"  {name}  " in full.split("summary:")[1]
    assert len(compact.splitlines()) < 80 < 3 * n < len(full.splitlines())
