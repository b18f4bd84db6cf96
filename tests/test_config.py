"""Configuration as typed data: per-field checks that name the field, --set parsed by the
declared type, stored configurations read with defaults for missing fields and refused for
unknown ones, and today's files read and written byte for byte."""
import dataclasses
import json

import h5py
import pytest

from conftest import assert_user_error, run_cli
from mpitrain import checkpoint as ckpt
from mpitrain import config
from mpitrain.config import PRESETS, ModelConfig, TrainConfig, setting
from mpitrain.errors import UserError
from mpitrain.trainer import plan
from test_checkpoint import _save

# The fields and the exact root attributes a checkpoint written before configuration fields
# had declared types holds (written by that version's save_checkpoint for the MODEL and
# TRAIN of tests/test_checkpoint.py). These strings must keep loading and keep being written.
TODAY_MODEL_FIELDS = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_ff")
TODAY_TRAIN_FIELDS = ("seq_len", "batch_size", "lr", "weight_decay", "beta1", "beta2", "eps",
                      "clip", "warmup", "epochs", "max_steps", "save_every", "eval_every",
                      "eval_windows", "seed", "keep_last")
TODAY_MODEL_JSON = ('{"d_ff": 16, "d_model": 8, "max_seq_len": 8, "n_heads": 2, "n_layers": 1, '
                    '"vocab_size": 260}')
TODAY_TRAIN_JSON = ('{"batch_size": 12, "beta1": 0.9, "beta2": 0.999, "clip": 1.0, "epochs": 1, '
                    '"eps": 1e-08, "eval_every": 5, "eval_windows": 8, "keep_last": 0, '
                    '"lr": 0.003, "max_steps": 0, "save_every": 10, "seed": 5, "seq_len": 16, '
                    '"warmup": 2, "weight_decay": 0.01}')
# Fields added since are optional (config.setting): each has the default that reproduces what
# older files meant and is stored only when it differs, so a file written today with the
# defaults holds exactly today's strings above.
ADDED_TRAIN = {}
WRITTEN_TRAIN_JSON = json.dumps({**json.loads(TODAY_TRAIN_JSON), **ADDED_TRAIN}, sort_keys=True)
TODAY_MODEL = ModelConfig(vocab_size=260, max_seq_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=16)
TODAY_TRAIN = TrainConfig(seq_len=16, batch_size=12, lr=0.003, weight_decay=0.01, beta1=0.9,
                          beta2=0.999, eps=1e-8, clip=1.0, warmup=2, epochs=1, max_steps=0,
                          save_every=10, eval_every=5, eval_windows=8, seed=5, keep_last=0)


@dataclasses.dataclass(frozen=True)
class ModelConfigWithPosition(ModelConfig):
    """ModelConfig as the next field would make it: one line of each kind a field can be."""
    norm: str = setting("layer", choices=("layer", "rms"))           # a str field
    tied: bool = setting(True)                                       # a bool field
    dropout: float = setting(0.0, min=0, below=1)                    # a bounded float


def _stored(path):
    a = h5py.File(path, "r").attrs
    return a["model_config"], a["train_config"]


def test_today_s_fields_and_order_are_unchanged():
    # fields added since come after today's and are optional: stored only when not default
    model_fields = dataclasses.fields(ModelConfig)
    assert tuple(f.name for f in model_fields[:len(TODAY_MODEL_FIELDS)]) == TODAY_MODEL_FIELDS
    assert all(f.metadata["optional"] for f in model_fields[len(TODAY_MODEL_FIELDS):])
    train_fields = dataclasses.fields(TrainConfig)
    assert tuple(f.name for f in train_fields[:len(TODAY_TRAIN_FIELDS)]) == TODAY_TRAIN_FIELDS
    assert all(f.metadata["optional"] for f in train_fields[len(TODAY_TRAIN_FIELDS):])
    assert tuple(TODAY_TRAIN.to_dict()) == TODAY_TRAIN_FIELDS     # metrics.jsonl, train.log
    assert json.dumps(TODAY_MODEL.to_dict(), sort_keys=True) == TODAY_MODEL_JSON
    assert json.dumps(TODAY_TRAIN.to_dict(), sort_keys=True) == WRITTEN_TRAIN_JSON
    assert TrainConfig.from_dict(json.loads(TODAY_TRAIN_JSON)) == TODAY_TRAIN
    # the defaults are those the fields had (the seed preset's configuration)
    assert ModelConfig().to_dict() == PRESETS["seed"]["model"]
    assert TrainConfig() == TrainConfig(**PRESETS["seed"]["train"], beta1=0.9, beta2=0.999,
                                        eps=1e-8, max_steps=0, eval_windows=64, seed=0,
                                        keep_last=0)


def test_an_optional_field_is_stored_only_when_set(tmp_path):
    changed = dataclasses.replace(TODAY_TRAIN, sample_tokens=5)
    assert changed.to_dict() == {**json.loads(TODAY_TRAIN_JSON), "sample_tokens": 5}
    assert TrainConfig.from_dict(changed.to_dict()) == changed
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path, model_config=TODAY_MODEL, train_config=changed)
    assert json.loads(_stored(path)[1])["sample_tokens"] == 5
    assert ckpt.load_checkpoint(path).train_config == changed


def test_today_s_checkpoint_and_export_read_and_write_the_same_bytes(tmp_path):
    path, out = tmp_path / "checkpoint_step_7.h5", tmp_path / "model.h5"
    _save(path, model_config=TODAY_MODEL, train_config=TODAY_TRAIN)
    assert _stored(path) == (TODAY_MODEL_JSON, WRITTEN_TRAIN_JSON)
    ck = ckpt.load_checkpoint(path)
    assert ck.model_config == TODAY_MODEL and ck.train_config == TODAY_TRAIN
    ckpt.export_weights(path, out)
    assert _stored(out) == (TODAY_MODEL_JSON, WRITTEN_TRAIN_JSON)
    assert ckpt.load_checkpoint(out).model_config == TODAY_MODEL
    # the file as written from the stored JSON itself (what today's main hands the writer)
    _save(path, model_config=json.loads(TODAY_MODEL_JSON),
          train_config=json.loads(TODAY_TRAIN_JSON))
    assert _stored(path) == (TODAY_MODEL_JSON, TODAY_TRAIN_JSON)
    assert ckpt.load_checkpoint(path).train_config == TODAY_TRAIN


def test_a_field_the_file_lacks_reads_as_its_default(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path, model_config=TODAY_MODEL, train_config=TODAY_TRAIN)
    monkeypatch.setattr(ckpt, "ModelConfig", ModelConfigWithPosition)
    ck = ckpt.load_checkpoint(path)
    assert (ck.model_config.norm, ck.model_config.tied, ck.model_config.dropout) == \
        ("layer", True, 0.0)
    assert ck.model_config == ModelConfigWithPosition(**TODAY_MODEL.to_dict())
    stored = json.loads(TODAY_TRAIN_JSON)
    del stored["keep_last"], stored["eps"]
    assert TrainConfig.from_dict(stored) == dataclasses.replace(TODAY_TRAIN, keep_last=0,
                                                                eps=1e-8)


def test_a_field_this_version_does_not_know_is_refused_by_name(tmp_path):
    newer = ModelConfigWithPosition(**TODAY_MODEL.to_dict(), norm="rms")
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path, model_config=newer, train_config=TODAY_TRAIN)
    with pytest.raises(UserError, match="unknown ModelConfig fields 'dropout', 'norm', 'tied': "
                       "written by a newer mpitrain"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ValueError, match="unknown TrainConfig fields 'a', 'b'"):
        TrainConfig.from_dict({**TODAY_TRAIN.to_dict(), "a": 1, "b": 2})
    with pytest.raises(ValueError, match="stored as list"):
        ModelConfig.from_dict([1, 2])


def test_a_stored_value_is_checked_by_name(tmp_path):
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path, model_config=TODAY_MODEL, train_config={**TODAY_TRAIN.to_dict(), "beta2": 1.5})
    with pytest.raises(UserError, match=r"configuration is invalid \(beta2 must be less than 1"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("cls, field, value, message", [
    (ModelConfig, "d_model", 0, "d_model must be at least 1, got 0"),
    (ModelConfig, "n_layers", 2.0, "n_layers must be an integer, got 2.0"),
    (ModelConfig, "d_ff", True, "d_ff must be an integer, got True"),
    (TrainConfig, "lr", 0.0, "lr must be positive, got 0.0"),
    (TrainConfig, "lr", float("inf"), "lr must be finite, got inf"),
    (TrainConfig, "clip", "1", "clip must be a number, got '1'"),
    (TrainConfig, "beta1", 1, "beta1 must be less than 1, got 1.0"),
    (TrainConfig, "weight_decay", -0.5, "weight_decay must not be negative, got -0.5"),
    (TrainConfig, "warmup", -1, "warmup must not be negative, got -1"),
    (ModelConfigWithPosition, "norm", "batch", "norm must be one of layer, rms, got 'batch'"),
    (ModelConfig, "position", "alibi", "position must be one of learned, rotary, got 'alibi'"),
    (ModelConfigWithPosition, "tied", 1, "tied must be true or false, got 1"),
])
def test_construction_checks_each_field_by_name(cls, field, value, message):
    with pytest.raises(ValueError) as e:
        cls(**{field: value})
    assert str(e.value) == message


def test_a_float_field_given_an_int_holds_a_float():
    t = TrainConfig(clip=0, lr=1)
    assert type(t.clip) is float and type(t.lr) is float and t.to_dict()["clip"] == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.clip = 1.0
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by n_heads \(4\)"):
        ModelConfig(d_model=30, n_heads=4)


@pytest.mark.parametrize("text, value", [("rotary", "rotary"), (" learned ", "learned")])
def test_set_parses_a_str_choice(monkeypatch, text, value):
    _with_position(monkeypatch)
    assert plan.parse_sets([f"position={text}"]) == {"position": value}


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), ("1", True),
                                         ("0", False), ("yes", True), ("NO", False)])
def test_set_parses_a_bool(monkeypatch, text, value):
    _with_position(monkeypatch)
    assert plan.parse_sets([f"tied={text}"]) == {"tied": value}


def test_set_parses_int_and_float_by_the_declared_type():
    got = plan.parse_sets(["d_model=64", "lr=1e-3", "clip=0", "seed= 7 ", "max_steps=1_000"])
    assert got == {"d_model": 64, "lr": 1e-3, "clip": 0.0, "seed": 7, "max_steps": 1000}
    assert type(got["clip"]) is float and type(got["d_model"]) is int


@pytest.mark.parametrize("item, message", [
    ("d_model=1.5", "--set d_model=1.5: expected int"),
    ("lr=fast", "--set lr=fast: expected float"),
    ("lr=nan", "--set lr=nan: lr must be finite, got nan"),
    ("d_model=0", "--set d_model=0: d_model must be at least 1, got 0"),
    ("beta2=1", "--set beta2=1: beta2 must be less than 1, got 1.0"),
    ("eps=-1e-8", "--set eps=-1e-8: eps must be positive, got -1e-08"),
    ("tied=maybe", "--set tied=maybe: expected a bool (true/false/1/0/yes/no)"),
    ("position=Rotary", "--set position=Rotary: position must be one of learned, rotary, "
                        "got 'Rotary'"),
])
def test_set_refuses_a_bad_value_by_name(monkeypatch, item, message):
    _with_position(monkeypatch)
    with pytest.raises(UserError) as e:
        plan.parse_sets([item])
    assert str(e.value) == message


def test_bad_values_are_one_line_with_exit_2_before_anything_is_written(tmp_path):
    for args, message in [(("--set", "d_model=abc"), "--set d_model=abc: expected int"),
                          (("--set", "beta1=1.5"), "beta1 must be less than 1"),
                          (("--batch-size", "0"), "batch_size must be at least 1, got 0"),
                          (("--lr", "nan"), "lr must be finite, got nan")]:
        assert_user_error(run_cli("train", *args, cwd=tmp_path), message)
    assert not list(tmp_path.iterdir())   # the default corpus was not prepared


def test_dedicated_options_and_set_are_checked_alike():
    with pytest.raises(UserError, match="^batch_size must be at least 1, got 0$"):
        plan.resolve_configs("tiny", {"batch_size": 0}, vocab_size=300, seq_len=12)
    with pytest.raises(UserError, match="^lr must be positive, got -1.0$"):
        plan.resolve_configs("tiny", {"lr": -1.0}, vocab_size=300, seq_len=12)


def test_every_field_is_checkable():
    for cls in (ModelConfig, TrainConfig, ModelConfigWithPosition):
        for f in dataclasses.fields(cls):
            assert config.check(f, f.default) == f.default
    with pytest.raises(TypeError, match="str without choices"):
        config.parse(_field("name", str, setting("x")), "x")
    with pytest.raises(TypeError, match="has type"):
        config.parse(_field("items", list, setting(())), "x")


def _field(name, kind, f):
    """A dataclasses.Field outside a class, as fields() would give it."""
    f.name, f.type = name, kind
    return f


def _with_position(monkeypatch):
    """parse_sets as it would be with ModelConfigWithPosition as the ModelConfig."""
    keys = tuple(f.name for f in dataclasses.fields(ModelConfigWithPosition))
    monkeypatch.setattr(plan, "ModelConfig", ModelConfigWithPosition)
    monkeypatch.setattr(plan, "MODEL_KEYS", keys)
