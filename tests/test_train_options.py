"""train's options: --set refused by name, the configuration precedence, user errors as one
line with exit 2 on every rank, --show-topology."""
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
