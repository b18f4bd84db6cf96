"""HDF5 checkpoints: bit-exact round trip, damage detection, atomic writes, resume, export."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from mpitrain import checkpoint as ckpt
from mpitrain import optim
from mpitrain.config import ModelConfig, TrainConfig
from mpitrain.errors import UserError
from mpitrain.schedule import DataPosition
from mpitrain.tokenizer import Tokenizer

TOK = Tokenizer(["hello", " world", " the"])
MODEL = ModelConfig(vocab_size=TOK.vocab_size, max_seq_len=8, d_model=8, n_layers=1,
                    n_heads=2, d_ff=16)
TRAIN = TrainConfig.preset("tiny", seed=5)


def _tensors(seed):
    """A GPT-2-named parameter set of the MODEL shapes (float32, random bits incl. -0.0)."""
    rng = np.random.default_rng(seed)
    V, C, T, F = MODEL.vocab_size, MODEL.d_model, MODEL.max_seq_len, MODEL.d_ff
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
              "transformer.h.0.ln_1.weight": (C,), "transformer.h.0.attn.c_attn.weight": (3 * C, C),
              "transformer.h.0.mlp.c_fc.weight": (F, C), "lm_head.weight": (V, C)}
    out = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    out["transformer.h.0.ln_1.weight"][0] = -0.0
    return out


def _save(path, step=7, m=None, v=None, **kw):
    """Writes a checkpoint of random tensors; returns (params, m, v): AdamW's two states."""
    params, m, v = kw.pop("params", _tensors(1)), m or _tensors(2), v or _tensors(3)
    args = dict(model_config=MODEL, train_config=TRAIN, params=params,
                optimizer_state={"m": m, "v": v}, step=step,
                epoch=1, data_position=DataPosition(1, 4),
                rng_state={"bit_generator": "PCG64", "state": {"state": 2 ** 100 + 3}},
                train_loss=3.25, val_loss=None, tokenizer=TOK, extra={"world": 3})
    args.update(kw)
    ckpt.save_checkpoint(path, **args)
    return params, m, v


def _same_bits(a, b):
    assert list(a) == list(b)
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype == np.float32
        assert a[n].tobytes() == b[n].tobytes(), n


def test_round_trip_bit_exact(tmp_path):
    path = tmp_path / "checkpoint_step_7.h5"
    params, m, v = _save(path)
    ck = ckpt.load_checkpoint(path)
    assert ck.format == "mpitrain-checkpoint"
    _same_bits(ck.params, params)
    assert list(ck.optimizer_state) == list(optim.ADAMW.state) == ["m", "v"]
    _same_bits(ck.optimizer_state["m"], m)
    _same_bits(ck.optimizer_state["v"], v)
    assert ck.model_config == MODEL and ck.train_config == TRAIN
    assert (ck.step, ck.epoch, ck.data_position) == (7, 1, DataPosition(1, 4))
    assert ck.rng_state == {"bit_generator": "PCG64", "state": {"state": 2 ** 100 + 3}}
    assert ck.train_loss == 3.25 and ck.val_loss is None
    assert ck.extra == {"world": 3} and ck.created_by["program"] == "mpitrain"
    assert ck.param_names == list(params)
    assert ck.tokenizer.decode(TOK.encode("hello the world")) == "hello the world"
    assert Tokenizer.from_file(path).vocab_size == TOK.vocab_size
    assert ckpt.verify(path) == []
    with h5py.File(path, "r") as f:  # readable by any HDF5 tool, with the documented names
        assert f.attrs["format"] == "mpitrain-checkpoint" and f.attrs["format_version"] == 1
        assert f["optimizer/v/lm_head.weight"].shape == (MODEL.vocab_size, MODEL.d_model)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_groups_follow_the_optimizer_declaration():
    """One group per declared state tensor, in the declaration's order, in the file, inspect and
    docs/FORMATS.md."""
    import pathlib

    from mpitrain import inspect_checkpoint

    assert list(ckpt.TENSOR_GROUPS.values()) == ["params"] + [f"optimizer/{s}"
                                                             for s in optim.ADAMW.state]
    assert inspect_checkpoint.GROUPS == tuple(ckpt.TENSOR_GROUPS.values())
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "FORMATS.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `/optimizer/<state>/"))
    assert "`ADAMW.state`" in row and all(f"`{s}`" in row for s in optim.ADAMW.state)


def test_same_inputs_give_identical_bytes(tmp_path, monkeypatch):
    # track_times=False: no HDF5 object timestamps, so only created_by (fixed here) could differ.
    monkeypatch.setattr(ckpt, "created_by", lambda: {"program": "mpitrain", "time_utc": "fixed"})
    _save(tmp_path / "a.h5")
    time.sleep(1.1)
    _save(tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_load_into_existing_arrays_without_copy(tmp_path):
    path = tmp_path / "c.h5"
    params, m, v = _save(path)
    arena = np.zeros(sum(a.size for a in params.values()), np.float32)
    views, off = {}, 0
    for n, a in params.items():
        views[n] = arena[off:off + a.size].reshape(a.shape)
        off += a.size
    ck = ckpt.load_checkpoint(path, params_into=views, load_optimizer=False)
    assert ck.optimizer_state is None
    assert all(ck.params[n] is views[n] for n in views)
    assert arena.tobytes() == b"".join(a.tobytes() for a in params.values())
    wrong = dict(views)
    wrong["lm_head.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(UserError, match=r"lm_head.weight: the model expects shape \[3, 3\]"):
        ckpt.load_checkpoint(path, params_into=wrong)
    fewer = {n: a for n, a in views.items() if n != "lm_head.weight"}
    with pytest.raises(UserError, match="parameter names: the model has 5, the file 6"):
        ckpt.load_checkpoint(path, params_into=fewer)


def _flip_byte_in(path, dataset, at=5):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("dataset", ["params/transformer.wpe.weight", "optimizer/m/lm_head.weight",
                                     "optimizer/v/transformer.h.0.ln_1.weight",
                                     "vocab/token_bytes"])
def test_flipped_byte_detected(tmp_path, dataset):
    path = tmp_path / "c.h5"
    _save(path)
    _flip_byte_in(path, dataset)
    with pytest.raises(UserError) as e:
        ckpt.load_checkpoint(path)
    assert f"/{dataset} fails its checksum" in str(e.value) and str(path) in str(e.value)
    assert any(dataset in p for p in ckpt.verify(path))


def test_damaged_attribute_detected(tmp_path):
    path = tmp_path / "c.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["step"] = np.int64(8)  # edited without updating the checksum
    assert ckpt.verify(path) == ["root attributes fail their checksum: the file is damaged"]


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file_detected(tmp_path, keep):
    path = tmp_path / "c.h5"
    _save(path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep))
    with pytest.raises(UserError, match="c.h5: "):
        ckpt.load_checkpoint(path)
    assert ckpt.verify(path)


def test_foreign_and_missing_files(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("just text\n")
    with pytest.raises(UserError, match="not a readable HDF5 file"):
        ckpt.load_checkpoint(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["format"] = "mpitrain-dataset"
    with pytest.raises(UserError, match="not an mpitrain checkpoint or weights file "
                                        r"\(format 'mpitrain-dataset'\)"):
        ckpt.load_checkpoint(other)
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1, 2])
    with pytest.raises(UserError, match="no format attribute"):
        ckpt.load_checkpoint(other)
    with pytest.raises(UserError, match="no such file"):
        ckpt.load_checkpoint(tmp_path / "absent.h5")
    newer = tmp_path / "newer.h5"
    _save(newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = np.int64(99)
    with pytest.raises(UserError, match="format version 99 is not supported"):
        ckpt.load_checkpoint(newer)


def test_missing_and_extra_tensors_named(tmp_path):
    path = tmp_path / "c.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        del f["optimizer/m/transformer.wpe.weight"]
        f["optimizer/m/bogus"] = np.zeros(2, np.float32)
    problems = ckpt.verify(path)
    assert problems == ["/optimizer/m: expected 6 tensors, found 6; missing: "
                        "transformer.wpe.weight; unexpected: bogus"]


class _FailingTokenizer:
    def to_hdf5(self, group):
        group.attrs["half"] = "written"
        raise RuntimeError("disk full (simulated)")


def test_failure_mid_write_leaves_no_file(tmp_path):
    path = tmp_path / "checkpoint_step_7.h5"
    with pytest.raises(RuntimeError, match="simulated"):
        _save(path, tokenizer=_FailingTokenizer())
    assert list(tmp_path.iterdir()) == []
    # An older file under the same name survives a failed overwrite untouched.
    params, _, _ = _save(path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        _save(path, tokenizer=_FailingTokenizer(), params=_tensors(9))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_killed_mid_write_leaves_no_file_under_the_real_name(tmp_path):
    # A process SIGKILLed while writing (inside the vocabulary) cannot clean up: only the
    # hidden temporary may remain, never the real name, and find_resume ignores it.
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_checkpoint as t
        class Killer:
            def to_hdf5(self, group):
                os.kill(os.getpid(), signal.SIGKILL)
        t._save({str(tmp_path / 'checkpoint_step_9.h5')!r}, tokenizer=Killer())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    names = [p.name for p in tmp_path.iterdir()]
    assert "checkpoint_step_9.h5" not in names
    assert all(n.startswith(".checkpoint_step_9.h5.tmp-") for n in names)
    assert ckpt.find_resume(tmp_path) is None


def test_find_resume_skips_damaged_newest(tmp_path, capsys):
    assert ckpt.find_resume(tmp_path / "nowhere") is None
    assert ckpt.find_resume(tmp_path) is None
    for step in (0, 10, 20, 100):
        _save(tmp_path / f"checkpoint_step_{step}.h5", step=step)
    (tmp_path / "checkpoint_step_500.h5.bak").write_text("not a checkpoint name")
    assert ckpt.find_resume(tmp_path).name == "checkpoint_step_100.h5"  # numeric, not text order
    _flip_byte_in(tmp_path / "checkpoint_step_100.h5", "params/lm_head.weight")
    with open(tmp_path / "checkpoint_step_20.h5", "r+b") as fh:
        fh.truncate(1000)
    assert ckpt.find_resume(tmp_path).name == "checkpoint_step_10.h5"
    err = capsys.readouterr().err
    assert "warning: skipping damaged checkpoint" in err
    assert "checkpoint_step_100.h5" in err and "checkpoint_step_20.h5" in err


def test_export_weights(tmp_path):
    src = tmp_path / "checkpoint_step_7.h5"
    params, _, _ = _save(src)
    out = ckpt.export_weights(src, tmp_path / "model.h5")
    ck = ckpt.load_checkpoint(out)
    assert ck.format == "mpitrain-weights" and ck.optimizer_state is None
    _same_bits(ck.params, params)
    assert ck.model_config == MODEL and ck.step == 7 and ck.train_loss == 3.25
    assert ck.created_by["source"]["path"] == str(src)
    assert ck.tokenizer.vocab_size == TOK.vocab_size
    with h5py.File(out, "r") as f:
        assert "optimizer" not in f
    assert out.stat().st_size < src.stat().st_size / 2
    # An export can be exported again, and damage in it is caught the same way.
    ckpt.export_weights(out, tmp_path / "again.h5")
    _flip_byte_in(out, "params/transformer.wte.weight")
    assert ckpt.verify(out) == ["/params/transformer.wte.weight fails its checksum: "
                                "the file is damaged"]
    with pytest.raises(UserError, match="overwrite its source"):
        ckpt.export_weights(src, src)
    with pytest.raises(UserError, match="does not exist"):
        ckpt.export_weights(src, tmp_path / "no" / "dir.h5")
