"""train's options: --set refused by name, the configuration precedence, user errors as one
line with exit 2 on every rank, --show-topology."""
import json
import os
from types import SimpleNamespace

import pytest

from conftest import assert_user_error, run_cli
from mpitrain.config import PRESETS, ModelConfig, TrainConfig
from mpitrain.errors import UserError
from mpitrain.topology import placement_table
from mpitrain.trainer.plan import parse_sets, resolve_configs
from test_train_support import run_train, tiny_args, tiny_dataset  # noqa: F401 (fixture)


def test_set_parses_types_and_refuses_unknown_keys():
    assert parse_sets(["lr=0.5", "d_model=64", "warmup=3"]) == {"lr": 0.5, "d_model": 64,
                                                                  "warmup": 3}
    with pytest.raises(UserError, match="--set lerning_rate: unknown key"):
        parse_sets(["lerning_rate=1"])
    with pytest.raises(UserError, match="vocab_size comes from the dataset"):
        parse_sets(["vocab_size=100"])
    with pytest.raises(UserError, match="seq_len comes from the dataset"):
        parse_sets(["seq_len=100"])
    with pytest.raises(UserError, match="expected int"):
        parse_sets(["d_model=1.5"])
    with pytest.raises(UserError, match="expected key=value"):
        parse_sets(["lr"])


def test_precedence_preset_checkpoint_options():
    # preset only; vocab and seq_len from the dataset
    m, t = resolve_configs("tiny", {}, vocab_size=300, seq_len=12)
    assert m == ModelConfig(**{**PRESETS["tiny"]["model"], "vocab_size": 300})
    assert t.seq_len == 12 and t.lr == PRESETS["tiny"]["train"]["lr"]
    # options over the preset
    m, t = resolve_configs("tiny", {"lr": 0.5, "d_model": 64}, 300, 12)
    assert t.lr == 0.5 and m.d_model == 64
    # on resume: the checkpoint's architecture and training configuration, options on top
    ck = SimpleNamespace(path="ck.h5", model_config=ModelConfig(vocab_size=300, max_seq_len=16,
                                                               d_model=8, n_layers=1,
                                                               n_heads=2, d_ff=16),
                         train_config=TrainConfig(seq_len=12, lr=0.25, batch_size=5))
    m, t = resolve_configs("small", {"batch_size": 7}, 300, 12, ck)
    assert m == ck.model_config
    assert t.lr == 0.25 and t.batch_size == 7
    with pytest.raises(UserError, match="architecture comes from the checkpoint"):
        resolve_configs("small", {"d_model": 16}, 300, 12, ck)
    with pytest.raises(UserError, match="vocabulary size"):
        resolve_configs("small", {}, 301, 12, ck)
    with pytest.raises(UserError, match="exceeds the model's max_seq_len"):
        resolve_configs("tiny", {}, 300, 64)


@pytest.mark.slow
def test_set_refused_on_the_command_line():
    assert_user_error(run_cli("train", "--set", "lerning_rate=3"), "--set lerning_rate")
    assert_user_error(run_cli("--batch-size", "4", "--set", "batch_size=5"), "both given")


def test_show_topology_prints_the_placement_table(tmp_path):
    proc = run_cli("train", "--show-topology", "--preset", "tiny", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == placement_table(11, PRESETS["tiny"]["train"]["batch_size"])
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.slow
def test_show_topology_under_mpirun(tmp_path):
    proc = run_train(4, "--show-topology", "--batch-size", 32, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table, _, nodes = proc.stdout.strip().partition("\n1 node(s):\n")
    assert table == placement_table(3, 32)                # printed once, by rank 0
    assert nodes.strip().startswith("node 0 on ")         # then the nodes and their hosts
    assert "ranks 0 (Node Zero), 1 (worker 0), 2 (worker 1), 3 (worker 2)" in nodes


@pytest.mark.slow
def test_missing_dataset_is_one_line_on_every_rank(tmp_path):
    missing = str(tmp_path / "nope.h5")
    proc = run_train(3, "--dataset", missing, "--run-dir", str(tmp_path / "run"), timeout=60)
    assert_user_error(proc, "no such dataset file")
    assert not os.path.exists(tmp_path / "run")  # no partial files


@pytest.mark.slow
def test_existing_run_needs_resume(tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "run")
    first = run_train(2, *tiny_args(tiny_dataset, run_dir, "--max-steps", 2))
    assert first.returncode == 0, first.stderr
    again = run_train(2, *tiny_args(tiny_dataset, run_dir, "--max-steps", 2))
    assert_user_error(again, "already holds checkpoints")
    done = run_train(2, *tiny_args(tiny_dataset, run_dir, "--max-steps", 2, "--resume", "auto"))
    assert_user_error(done, "nothing to do")


@pytest.mark.parametrize("cpus, local, expected", [(2, 2, 2), (2, 3, 1), (2, 12, 1),
                                                   (48, 13, 4), (1, 2, 1), (8, "junk", 1)])
def test_threads_per_rank_default_shares_the_node_s_cpus(monkeypatch, cpus, local, expected):
    """Without --threads-per-rank, the node's CPUs are divided among its workers (Node Zero
    not counted): the one worker of mpirun -n 2 on 2 CPUs gets both (measured: 805 -> 1412
    tokens/s on the seed preset). An unreadable MPI_LOCALNRANKS falls back to the world."""
    from mpitrain import launcher
    from mpitrain.commands.train import default_threads_per_rank

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    # one node of a 24-rank job
    launch = launcher.detect({"PMI_SIZE": "24", "MPI_LOCALNRANKS": str(local)})
    assert default_threads_per_rank(launch) == expected


def test_sample_settings_are_typed_training_fields():
    from mpitrain.trainer import sampling

    # the defaults are what the sample always was: 32 tokens at temperature 0.8, the
    # validation split's first tokens as the prompt
    tc = TrainConfig()
    assert (tc.sample_tokens, tc.sample_temperature, tc.sample_prompt) == (32, 0.8, "")
    assert (sampling.NEW_TOKENS, sampling.TEMPERATURE) == (32, 0.8)
    # a prompt keeps its spaces (they are text); numbers are checked by their rules
    assert parse_sets(["sample_prompt= def main", "sample_tokens=0",
                       "sample_temperature=0"]) == {"sample_prompt": " def main",
                                                    "sample_tokens": 0,
                                                    "sample_temperature": 0.0}
    with pytest.raises(UserError, match="sample_tokens must not be negative"):
        parse_sets(["sample_tokens=-1"])
    with pytest.raises(UserError, match="expected float"):
        parse_sets(["sample_temperature=warm"])
    assert TrainConfig.from_dict({"lr": 0.5}).sample_tokens == 32   # older checkpoints


def test_runlog_rate_window_and_log_every(tmp_path, monkeypatch, capsys):
    from mpitrain.trainer import runlog

    clock = [100.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: clock[0])
    log = runlog.RunLog(str(tmp_path), [("h", 1)], 40, 0, 40, progress="lines", log_every=7)
    # steps 1..40 at 0.5 s each, with one slow report (an evaluation) before step 20
    for step in range(1, 41):
        clock[0] += 0.5 + (3.0 if step == 20 else 0.0)
        log.step_done(step, 2.0, 1e-3, 1.0, 100, 0.5, 1.0)
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [int(l.split()[1].split("/")[0]) for l in lines] == [1, 7, 14, 21, 28, 35, 40]
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    rate = {r["step"]: r["tokens_per_s"] for r in records}
    # 100 tokens a step: over the last RATE_WINDOW (10) reports, 10 steps in 5 s = 200 tok/s;
    # a window holding the slow report: 10 steps in 8 s; exact in binary floating point
    assert rate[10] == rate[40] == 200.0 and rate[29] == 100 * 10 / 8.0
    assert rate[1] == 200.0 and rate[5] == 200.0   # fewer than 10 reports: the ones there are
    assert all(r["step_s"] == 0.5 for r in records)
    assert "200 tok/s  0.500 s/step" in lines[-1]


def test_runlog_progress_none_and_quiet(tmp_path, capsys):
    from mpitrain.trainer import runlog

    for kw in ({"progress": "none"}, {"quiet": True, "log_every": 1}):
        log = runlog.RunLog(str(tmp_path), [("h", 1)], 5, 0, 5, **kw)
        for step in range(1, 6):
            log.step_done(step, 2.0, 1e-3, 1.0, 100, 0.5, 1.0)
        log.close()
        assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_log_every_record_of_the_command_and_resume_warnings(tiny_dataset, tmp_path):
    from mpitrain.checkpoint import load_checkpoint
    from mpitrain.hf_export import model_card

    run_dir = str(tmp_path / "run")
    args = ["--preset", "tiny", "--dataset", tiny_dataset, "--run-dir", run_dir, "--epochs", 100,
            "--max-steps", 20, "--eval-every", 5, "--save-every", 10, "--log-every", 4,
            "--set", "sample_tokens=3", "--set", "sample_prompt= the"]
    first = run_train(3, *args, "--stop-at", 10)
    assert first.returncode == 0, first.stderr
    steps = [l.split()[1] for l in first.stdout.splitlines() if l.startswith("step ") and "/" in
             l.split()[1]]
    assert steps == ["1/10", "4/10", "8/10", "10/10"]   # under mpirun too; first and last
    assert "warning" not in first.stderr
    ck = load_checkpoint(os.path.join(run_dir, "checkpoint_step_10.h5"))
    assert ck.extra["command"].startswith("mpitrain train --preset tiny --dataset ")
    assert "--log-every 4" in ck.extra["command"] and ck.extra["command"].endswith("3 ranks)")
    ds = ck.extra["dataset"]
    assert ds["path"] == os.path.abspath(tiny_dataset) and ds["format_version"] == 2
    assert ds["tokens"] > 0 and ds["documents"] > 0
    card = model_card(ck, os.path.join(run_dir, "checkpoint_step_10.h5"))
    assert "--log-every 4" in card and '"documents": ' in card
    assert "not recorded" not in card.split("## Training")[1].split("## Provenance")[0]
    assert (ck.train_config.sample_tokens, ck.train_config.sample_prompt) == (3, " the")
    # resume at another world size (1 worker instead of 2) with another preset named: one
    # warning each, once, even with --quiet
    again = run_train(2, *args[:1], "small", *args[2:], "--resume", "auto", "--quiet")
    assert again.returncode == 0, again.stderr
    warnings = [l for l in again.stderr.splitlines() if "warning" in l]
    assert len(warnings) == 2, again.stderr
    assert "--preset small is overridden by the checkpoint" in warnings[0]
    assert "2 worker(s), this one has 1" in warnings[1]
    assert again.stdout == ""
