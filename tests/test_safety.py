"""No completed checkpoint is lost or replaced by a worse one: non-finite values (skipped steps,
the stop after max_bad_steps, refused saves, find_resume), a resume that finds only damaged
files, pruning, strict metrics.jsonl. Fault injection through MPITRAIN_NONFINITE
(trainer/process.py). docs/RELIABILITY.md lists what each test covers."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import mpitrain.checkpoint as ckpt
from conftest import assert_user_error, run_cli
from mpitrain.errors import UserError
from mpitrain.trainer import saver
from test_checkpoint import _flip_byte_in, _save, _tensors
from test_train_support import _env, run_train, tiny_dataset  # noqa: F401 (fixture)


def thread_train(dataset, run_dir, *extra, env=None, timeout=180):
    """Thread mode, tiny preset, 20 planned steps, a checkpoint every 5."""
    args = ["train", "--preset", "tiny", "--dataset", dataset, "--run-dir", run_dir,
            "--max-steps", 20, "--epochs", 100, "--eval-every", 5, "--save-every", 5,
            "--threads", 3, "--quiet", *extra]
    return subprocess.run([sys.executable, "-m", "mpitrain", *map(str, args)], env=_env(env),
                          capture_output=True, text=True, timeout=timeout)


def strict_records(run_dir):
    """metrics.jsonl read by a strict JSON reader (NaN/Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def checkpoints(run_dir):
    return sorted((int(n[len("checkpoint_step_"):-3]), os.path.join(run_dir, n))
                  for n in os.listdir(run_dir) if n.startswith("checkpoint_step_"))


def assert_all_sound(run_dir):
    found = checkpoints(run_dir)
    assert found
    for _, path in found:
        assert ckpt.verify(path) == [], path
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]   # no temporary left
    return found


def state(path):
    ck = ckpt.load_checkpoint(path)
    return ck.params, ck.optimizer_state


def same_state(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in [(pa, pb)] + [(oa[s], ob[s]) for s in oa]:
        assert list(x) == list(y)
        for n in x:
            assert x[n].tobytes() == y[n].tobytes(), n


# --- non-finite values ------------------------------------------------------------------------

@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_resume_bitwise(tiny_dataset, tmp_path):
    """Steps 6-8 report NaN: their updates are skipped (the state after step 8 is that after
    step 5, bitwise), each is logged, metrics.jsonl stays strict JSON, every checkpoint is
    finite, and a run split at step 10 continues to the same final state bitwise."""
    env = {"MPITRAIN_NONFINITE": "6-8"}
    straight = str(tmp_path / "straight")
    r = thread_train(tiny_dataset, straight, "--save-every", 1, env=env)
    assert r.returncode == 0, r.stderr
    assert_all_sound(straight)
    same_state(state(f"{straight}/checkpoint_step_5.h5"), state(f"{straight}/checkpoint_step_8.h5"))
    records = strict_records(straight)
    assert [x["step"] for x in records if x.get("event") == "nonfinite"] == [6, 7, 8]
    losses = {x["step"]: x["loss"] for x in records if "loss" in x and "event" not in x}
    assert sorted(losses) == list(range(1, 21))          # the skipped steps still count
    assert [s for s, v in losses.items() if v is None] == [6, 7, 8]   # NaN written as null

    split = str(tmp_path / "split")
    first = thread_train(tiny_dataset, split, "--stop-at", 10, env=env)
    assert first.returncode == 0, first.stderr
    second = thread_train(tiny_dataset, split, "--resume", "auto", env=env)
    assert second.returncode == 0, second.stderr
    same_state(state(f"{straight}/checkpoint_step_20.h5"), state(f"{split}/checkpoint_step_20.h5"))


def test_max_bad_steps_in_a_row_stop_with_status_3_and_resume(tiny_dataset, tmp_path):
    run = str(tmp_path / "run")
    r = thread_train(tiny_dataset, run, "--set", "max_bad_steps=3",
                     env={"MPITRAIN_NONFINITE": "7-100"})
    assert r.returncode == 3, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpitrain: stopped after step 9:"), r.stderr
    assert "3 steps in a row" in lines[0] and "checkpoint_step_5.h5" in lines[0]
    assert "--resume auto" in lines[0] and "Traceback" not in r.stderr
    found = assert_all_sound(run)
    assert [s for s, _ in found] == [0, 5]
    assert any(x.get("event") == "fault" for x in strict_records(run))
    resumed = thread_train(tiny_dataset, run, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in assert_all_sound(run)] == [0, 5, 10, 15, 20]


@pytest.mark.slow
def test_fault_status_3_under_mpirun(tiny_dataset, tmp_path):
    run = str(tmp_path / "run")
    r = run_train(3, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run,
                  "--max-steps", 20, "--epochs", 100, "--save-every", 5, "--quiet",
                  "--set", "max_bad_steps=2", env={"MPITRAIN_NONFINITE": "3-100"})
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "mpitrain: stopped after step 4:" in r.stderr and "Traceback" not in r.stderr
    assert [s for s, _ in assert_all_sound(run)] == [0]


def test_save_refuses_a_nonfinite_state_and_readers_treat_one_as_damaged(tmp_path):
    params = _tensors(1)
    params["lm_head.weight"][3, 1] = np.nan
    with pytest.raises(ckpt.NonFiniteState, match="lm_head.weight is not finite: 1 NaN"):
        _save(tmp_path / "checkpoint_step_7.h5", params=params)
    assert list(tmp_path.iterdir()) == []
    # A loss that is not finite is left out rather than stored.
    _save(tmp_path / "checkpoint_step_3.h5", train_loss=float("nan"), val_loss=float("inf"))
    ck = ckpt.load_checkpoint(tmp_path / "checkpoint_step_3.h5")
    assert ck.train_loss is None and ck.val_loss is None
    # A non-finite tensor written by another program (checksums consistent) is damage.
    path = tmp_path / "checkpoint_step_9.h5"
    _save(path)
    with h5py.File(path, "r+") as f:
        ds = f["optimizer/v/lm_head.weight"]
        a = ds[()]
        a[0, 0] = np.inf
        ds[...] = a
        ds.attrs["crc32"] = np.uint32(ckpt.crc32(a))
    problems = ckpt.verify(path)
    assert problems == ["/optimizer/v/lm_head.weight is not finite: 0 NaN and 1 Inf among "
                        f"{a.size:,} values"]
    with pytest.raises(UserError, match="not finite"):
        ckpt.load_checkpoint(path)
    assert ckpt.find_resume(tmp_path).name == "checkpoint_step_3.h5"


def test_resume_auto_refuses_when_no_checkpoint_is_sound(tiny_dataset, tmp_path):
    run = str(tmp_path / "run")
    r = thread_train(tiny_dataset, run, "--stop-at", 5)
    assert r.returncode == 0, r.stderr
    for _, path in checkpoints(run):
        _flip_byte_in(path, "params/lm_head.weight")
    before = {p: open(p, "rb").read() for _, p in checkpoints(run)}
    with pytest.raises(UserError) as e:
        ckpt.find_resume(run)
    assert "checkpoint_step_0.h5: /params/lm_head.weight fails its checksum" in str(e.value)
    assert "checkpoint_step_5.h5: /params/lm_head.weight fails its checksum" in str(e.value)
    r = thread_train(tiny_dataset, run, "--resume", "auto")
    lines = [x for x in r.stderr.splitlines() if x.startswith("mpitrain: error:")]
    assert r.returncode == 2 and len(lines) == 1 and "none of the 2 checkpoint(s)" in lines[0]
    assert "Traceback" not in r.stderr
    assert before == {p: open(p, "rb").read() for _, p in checkpoints(run)}   # untouched


def test_prune_keeps_the_newest_sound_checkpoint(tmp_path):
    for s in (0, 10, 20, 30, 90):
        (tmp_path / f"checkpoint_step_{s}.h5").write_bytes(b"x")
    # 90 is from another timeline (newer than the checkpoint just written, 30): left alone.
    removed = saver.prune(str(tmp_path), 1, written=30)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint_step_10.h5",
                                                             "checkpoint_step_20.h5"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_step_0.h5", "checkpoint_step_30.h5",
                                            "checkpoint_step_90.h5"]
    assert saver.prune(str(tmp_path), 2, written=30) == []


def test_saver_hands_back_a_refused_save_without_raising(tmp_path):
    s = saver.Saver(str(tmp_path), keep_last=1)
    params = _tensors(1)
    params["transformer.wte.weight"][0, 0] = np.inf
    from test_checkpoint import MODEL, TOK, TRAIN
    from mpitrain.schedule import DataPosition

    s.start(4, model_config=MODEL, train_config=TRAIN, params=params,
            optimizer_state={"m": _tensors(2), "v": _tensors(3)}, epoch=0,
            data_position=DataPosition(), rng_state={}, train_loss=None, val_loss=None,
            tokenizer=TOK)
    while s.busy():
        pass
    result = s.finished()
    assert isinstance(result, saver.SaveFailed) and result.nonfinite
    assert "checkpoint_step_4.h5 was not written" in result.message
    assert os.listdir(tmp_path) == []


def test_metrics_are_strict_json(tmp_path):
    from mpitrain.trainer.runlog import strict_json

    record = {"loss": float("nan"), "x": [np.float64("inf"), 1.5], "y": {"z": -float("inf")}}
    assert json.dumps(strict_json(record), allow_nan=False) == \
        '{"loss": null, "x": [null, 1.5], "y": {"z": null}}'


def test_sample_of_nan_parameters_ends_instead_of_crashing():
    from mpitrain.config import ModelConfig
    from mpitrain.model import Model
    from mpitrain.trainer import sampling

    model = Model(ModelConfig.preset("tiny"), seed=0, threads=1)
    model.param_buffer[...] = np.nan
    out = sampling.generate(model, np.array([1, 2, 3], np.int32), 0, 5, context=16)
    assert out.dtype == np.int32 and out.size == 0


@pytest.mark.parametrize("option", [["--lr", "inf"], ["--set", "weight_decay=inf"],
                                    ["--set", "clip=nan"], ["--set", "max_bad_steps=0"],
                                    ["--on-save-error", "maybe"], ["--lr", "-1"]])
def test_options_not_finite_or_out_of_range_are_refused(tmp_path, option):
    r = run_cli("train", "--preset", "tiny", "--run-dir", tmp_path / "run", *option,
                cwd=tmp_path)
    assert_user_error(r, option[-1].split("=")[0] if option[0] == "--set" else option[0][2:])
    assert not (tmp_path / "run").exists()


# --- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """mount(size): a fresh tmpfs of that size under tmp_path (root only; skipped otherwise),
    unmounted afterwards. resize(size) remounts it larger or smaller."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def resize(where, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


@pytest.mark.slow
def test_full_disk_while_saving_stops_with_status_3_and_resumes_bitwise(tiny_dataset, tmp_path,
                                                                       small_fs):
    """A tiny checkpoint is 0.65 MB: 8 MB fill after about eleven. The save that does not fit
    is refused before HDF5 writes a byte; every earlier checkpoint verifies, no temporary is
    left, and with more space --resume auto ends on the uninterrupted run's state, bitwise."""
    fs = small_fs("8m")
    run = str(fs / "run")
    r = thread_train(tiny_dataset, run, "--save-every", 1)
    assert r.returncode == 3, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert lines[0].startswith("mpitrain: stopped after step ")
    assert "cannot write " in lines[0] and "not enough space" in lines[0] and "free there" in lines[0]
    found = assert_all_sound(run)
    last = found[-1][0]
    assert 5 <= last < 20 and f"newest sound checkpoint is {found[-1][1]}" in lines[0]
    resize(fs, "64m")
    resumed = thread_train(tiny_dataset, run, "--save-every", 1, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    straight = str(tmp_path / "straight")
    assert thread_train(tiny_dataset, straight).returncode == 0
    same_state(state(f"{straight}/checkpoint_step_20.h5"), state(f"{run}/checkpoint_step_20.h5"))


@pytest.mark.slow
def test_full_disk_under_mpirun_and_retry(tiny_dataset, small_fs):
    fs = small_fs("8m")
    run = str(fs / "run")
    r = run_train(3, "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run,
                  "--max-steps", 20, "--epochs", 100, "--save-every", 1, "--quiet")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "not enough space" in r.stderr and "Traceback" not in r.stderr
    assert_all_sound(run)
    # --on-save-error retry trains on to the end; its last save failing too is status 3
    retry = str(small_fs("4m") / "run")
    r = thread_train(tiny_dataset, retry, "--save-every", 1, "--on-save-error", "retry")
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert "the last checkpoint could not be written" in r.stderr
    records = strict_records(retry)
    assert max(x.get("step", 0) for x in records if "loss" in x) == 20
    assert sum(x.get("event") == "save_error" for x in records) >= 10
    assert_all_sound(retry)


def test_in_memory_write_reports_enospc_without_a_crash(small_fs):
    """The path the saver takes when space is tight: HDF5 builds the file in memory and a
    plain os.write meets the full disk -- an OSError, no temporary left, and the interpreter
    and h5py go on working (the next save succeeds)."""
    fs = small_fs("1m")
    big = {n: np.zeros((600, 200), np.float32) for n in ("a", "b")}   # 0.96 MB of params
    from test_checkpoint import MODEL, TOK, TRAIN
    from mpitrain.schedule import DataPosition

    args = dict(model_config=MODEL, train_config=TRAIN, epoch=0, data_position=DataPosition(),
                rng_state={}, train_loss=None, val_loss=None, tokenizer=TOK, step=1)
    with pytest.raises(OSError) as e:
        ckpt.save_checkpoint(fs / "checkpoint_step_1.h5", params=big,
                             optimizer_state={"m": big, "v": big}, in_memory=True, **args)
    assert e.value.errno == 28
    assert os.listdir(fs) == []
    small = {n: np.ones((4, 4), np.float32) for n in ("a", "b")}
    ckpt.save_checkpoint(fs / "checkpoint_step_2.h5", params=small,
                         optimizer_state={"m": small, "v": small}, in_memory=True, **args)
    assert ckpt.verify(fs / "checkpoint_step_2.h5", want_tokenizer=False) == []


def test_full_disk_at_start_is_one_line(tiny_dataset, small_fs):
    fs = small_fs("64k")
    r = thread_train(tiny_dataset, str(fs / "run"))
    assert_user_error(r, "free; one checkpoint of this model takes about")
    assert [n for n in os.listdir(fs / "run") if n != "train.lock"] == []


# --- one run per directory, leftovers ---------------------------------------------------------

@pytest.mark.slow
def test_second_launch_is_refused_naming_the_holder_and_the_lock_dies_with_its_process(
        tiny_dataset, tmp_path):
    import signal
    import time

    run = str(tmp_path / "run")
    args = ["train", "--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run,
            "--max-steps", 100000, "--epochs", 100000, "--save-every", 50, "--threads", 2,
            "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "mpitrain", *map(str, args)], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not os.path.exists(os.path.join(run, "checkpoint_step_50.h5")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() - t0 < 60
            time.sleep(0.2)
        holder = f"in use by another training run: pid {first.pid} on "
        fresh = run_cli(*args)
        assert_user_error(fresh, holder)
        resumed = run_cli(*args, "--resume", "auto")
        assert_user_error(resumed, holder)
        under_mpi = run_train(3, *args[1:-3], "--quiet", "--resume", "auto")   # MPICH, -n 3
        assert_user_error(under_mpi, holder)
        looked = run_cli("inspect", "--verify", os.path.join(run, "checkpoint_step_0.h5"))
        assert looked.returncode == 0, looked.stderr               # read-only: no lock
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the lock went with the process: a resume takes the directory over
    newest = checkpoints(run)[-1][0]
    again = run_cli(*args, "--resume", "auto", "--stop-at", newest + 10, timeout=180)
    assert again.returncode == 0, again.stderr
    assert_all_sound(run)


def test_leftover_temporaries_of_dead_writers_are_removed_and_reported(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [".checkpoint_step_7.h5.tmp-999999", "heartbeat.json.tmp",
                 "heartbeat.json.tmp-999998"]
    for name in leftovers:
        (run / name).write_bytes(b"half a file")
    (run / "notes.tmp").write_text("not ours: stays")
    r = thread_train(tiny_dataset, str(run), "--stop-at", 5)
    assert r.returncode == 0, r.stderr
    assert "removed 3 temporary file(s) left in" in r.stderr
    assert all(name in r.stderr for name in leftovers)
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == ["notes.tmp"]


def test_heartbeat_temporary_never_follows_a_planted_link(tmp_path):
    from mpitrain import atomic
    from mpitrain.trainer.runlog import RunLog

    target = tmp_path / "precious"
    target.write_text("keep me")
    path = tmp_path / "heartbeat.json"
    os.symlink(target, atomic.temporary_name(path))   # planted at the first name it would try
    RunLog._replace_heartbeat(str(path), "{}\n")
    assert target.read_text() == "keep me" and path.read_text() == "{}\n"
    assert not os.path.islink(path)


def test_run_dir_naming_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    r = run_cli("train", "--preset", "tiny", "--run-dir", tmp_path / "f", cwd=tmp_path)
    assert_user_error(r, "is a file, not a directory")
    r = run_cli("train", "--preset", "tiny", "--run-dir", tmp_path / "f" / "sub", cwd=tmp_path)
    assert_user_error(r, "is a file, not a directory")


# --- files: every attribute read back is checksummed; only our patterns -----------------------

CATASTROPHIC = r"(\w+\s?)+$"   # exponential backtracking on a long line without a match


def _edit_vocab_attrs(path, update_crc, **attrs):
    from mpitrain.tokenizer import attrs_crc

    with h5py.File(path, "r+") as f:
        g = f["vocab"]
        for k, v in attrs.items():
            if v is None:
                del g.attrs[k]
            else:
                g.attrs[k] = v
        if update_crc:
            g.attrs["attrs_crc32"] = np.uint32(attrs_crc(g.attrs))


def test_vocabulary_attributes_are_checksummed_and_only_our_patterns_read(tmp_path):
    path = tmp_path / "checkpoint_step_7.h5"
    _save(path)
    _edit_vocab_attrs(path, False, pattern=CATASTROPHIC)
    assert ckpt.verify(path) == ["its vocabulary is damaged: its attributes fail their checksum"]
    _edit_vocab_attrs(path, True)      # a consistent forgery: the pattern itself is refused
    assert ckpt.verify(path) == ["its vocabulary is damaged or not mpitrain's: its pre-token "
                                 "pattern is not one mpitrain writes"]
    _save(path)
    _edit_vocab_attrs(path, False, specials='["<|pad|>"]')
    assert ckpt.verify(path) == ["its vocabulary is damaged: its attributes fail their checksum"]
    # a version-1 vocabulary (no attribute checksum) written by an older mpitrain still reads
    _save(path)
    _edit_vocab_attrs(path, False, attrs_crc32=None, format_version=np.int64(1))
    assert ckpt.verify(path) == []
    assert ckpt.load_checkpoint(path).tokenizer.vocab_size == 1 + 256 + 3


def test_infer_refuses_a_tampered_pattern_at_once(tmp_path):
    from test_generate_support import save_model, scaled_model

    path = save_model(tmp_path / "model.h5", scaled_model(seed=6))
    _edit_vocab_attrs(path, True, pattern=CATASTROPHIC)
    r = run_cli("infer", "--model", path, "--prompt", "a" * 5000 + "!", "--max-new-tokens", 1,
                timeout=30)
    assert r.returncode == 2 and "pre-token pattern is not one mpitrain writes" in r.stderr


# --- bounded requests -------------------------------------------------------------------------

@pytest.mark.parametrize("option, part", [
    (["--batch-size", "100000000"], "activations"),
    (["--set", "d_model=100000", "--set", "n_heads=4"], "parameters and optimizer state"),
    (["--set", "d_ff=100000000"], "parameters and optimizer state")])
def test_a_run_that_cannot_fit_in_memory_is_refused_with_its_estimate(tiny_dataset, tmp_path,
                                                                      option, part):
    r = thread_train(tiny_dataset, str(tmp_path / "run"), *option, timeout=60)
    assert_user_error(r, "this run would need about ")
    assert part in r.stderr and "the machine has" in r.stderr
    assert not (tmp_path / "run").exists()


def test_the_memory_estimate_bounds_a_real_run():
    """The tiny and seed presets fit; the estimate grows with the batch in thread mode only
    up to MICRO_WINDOWS windows a call in MPI mode."""
    from mpitrain.config import ModelConfig, TrainConfig
    from mpitrain.trainer import memory

    mc, tc = ModelConfig.preset("seed"), TrainConfig.preset("seed")
    parts = memory.estimate(mc, tc, 11, False, 10 ** 7)
    assert parts["parameters and optimizer state"] == 16 * 33_785_856 * 12
    big = memory.estimate(mc, TrainConfig.preset("seed", batch_size=3200), 11, False, 10 ** 7)
    assert big["activations"] == parts["activations"]
    threads = memory.estimate(mc, TrainConfig.preset("seed", batch_size=3200), 11, True, 10 ** 7)
    assert threads["activations"] > 90 * parts["activations"] / 11
    # the dataset's size adds only Node Zero's epoch order: workers map the tokens
    huge = memory.estimate(mc, tc, 11, False, 10 ** 10)
    assert huge["schedule"] - parts["schedule"] == 2 * 8 * (10 ** 10 - 10 ** 7)
    assert {k: v for k, v in huge.items() if k != "schedule"} == \
        {k: v for k, v in parts.items() if k != "schedule"}


def test_prepare_refuses_an_absurd_seq_len(tmp_path, corpus_dir):
    r = run_cli("prepare", "--data", corpus_dir, "--out", tmp_path / "d.h5", "--seq-len",
                "100000000")
    assert_user_error(r, "--seq-len must be between 1 and 16,384")
    assert not (tmp_path / "d.h5").exists()


def test_node_zero_forgets_per_step_records():
    """Node Zero's per-step tables hold only what a queued command can still ask for, so its
    memory stays flat however long the run."""
    from collections import deque
    from types import SimpleNamespace

    from mpitrain.trainer.messages import SAVE, STEP, Command
    from mpitrain.trainer.node_zero import NodeZero

    nz = SimpleNamespace(positions={s: s for s in range(1000)},
                         losses={s: 1.0 for s in range(1, 998)}, done=997,
                         queue=deque([Command(SAVE, 997), Command(STEP, 998)]))
    NodeZero._prune_history(nz)
    assert list(nz.positions) == [997, 998, 999] and list(nz.losses) == [997]
