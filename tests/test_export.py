"""`mpitrain export CKPT --out MODEL.h5` through the command line."""
import h5py

from mpitrain import cli
from mpitrain.checkpoint import load_checkpoint
from test_checkpoint import _flip_byte_in, _same_bits, _save


def test_export_command(tmp_path, capsys):
    src, out = tmp_path / "checkpoint_step_7.h5", tmp_path / "model.h5"
    params, _, _ = _save(src)
    assert cli.main(["export", str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    ck = load_checkpoint(out)
    assert ck.format == "mpitrain-weights" and ck.optimizer_state is None
    _same_bits(ck.params, params)
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["params", "vocab"]
    # Refuses to overwrite without --force; with it, overwrites.
    assert cli.main(["export", str(src), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli.main(["export", str(src), "--out", str(out), "--force"]) == 0


def test_export_refuses_damaged_or_missing_input(tmp_path, capsys):
    src, out = tmp_path / "c.h5", tmp_path / "model.h5"
    _save(src)
    _flip_byte_in(src, "params/lm_head.weight")
    assert cli.main(["export", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fails its checksum" in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
    assert cli.main(["export", str(tmp_path / "none.h5"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
