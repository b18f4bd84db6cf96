"""Training across several nodes, on real multi-node MPI on one machine.

`mpiexec -launcher fork -hosts nodea:3,nodeb:2 -n 5` starts one MPICH proxy per named host, and
COMM_TYPE_SHARED then splits the ranks by host: two nodes whose messages take MPICH's network
path, not shared memory. Proofs held here:
- 2 nodes x 2 workers and 3 nodes of unequal size (1, 3, 1 workers) give the losses of the same
  number of workers on one node to 1e-4 relative (the same bound as across world sizes in
  test_train_mpi.py: only the order of the float sums differs; measured ~1e-8);
- per step each node sends at most 2 (nodes - 1)/nodes x the parameter bytes to the others
  (exactly that for the two-level exchange), and the flat exchange (MPITRAIN_HIERARCHICAL=0)
  sends that much per worker;
- 10 steps + resume + 10 on the same layout equal 20 straight, bit for bit;
- a checkpoint written on 2 nodes resumes on 1, and one written on 1 node resumes on 2 (losses
  to 1e-4 against the straight runs).
"""
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from test_train_support import (_env, end_record, mpirun_or_skip, read_metrics, run_train,
                                step_losses, tiny_args, tiny_dataset)  # noqa: F401 (fixture)

REL = 1e-4
TWO = "nodea:3,nodeb:2"            # Node Zero + 2 workers, 2 workers
THREE = "nodea:2,nodeb:3,nodec:1"  # Node Zero + 1 worker, 3 workers, 1 worker


def run_hosts(hosts: str, *args, env=None):
    n = sum(int(h.split(":")[1]) for h in hosts.split(","))
    cmd = [mpirun_or_skip(), "-launcher", "fork", "-hosts", hosts, "-n", str(n),
           sys.executable, "-m", "mpitrain", "train", *map(str, args)]
    return subprocess.run(cmd, env=_env(env), capture_output=True, text=True, timeout=180)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def _rel(a, b):
    return abs(a - b) / abs(b)


def _state(path):
    with h5py.File(path, "r") as f:
        return {g: {k: f[g][k][()] for k in f[g]} for g in ("params", "optimizer/m",
                                                             "optimizer/v")}


def _param_bytes(run_dir):
    state = _state(os.path.join(run_dir, "checkpoint_step_0.h5"))
    return sum(a.nbytes for a in state["params"].values())


@pytest.fixture(scope="module")
def runs(tiny_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    out = {}
    for name, how in [("one5", 5), ("one6", 6), ("two", TWO), ("three", THREE),
                      ("two_flat", TWO)]:
        run_dir = out[name] = str(base / name)
        env = {"MPITRAIN_HIERARCHICAL": "0"} if name == "two_flat" else None
        args = tiny_args(tiny_dataset, run_dir)
        _ok(run_train(how, *args) if isinstance(how, int) else run_hosts(how, *args, env=env))
    return out


def _assert_losses_agree(got_dir, ref_dir, steps=range(1, 21)):
    got, ref = step_losses(read_metrics(got_dir)), step_losses(read_metrics(ref_dir))
    for s in steps:
        assert _rel(got[s], ref[s]) < REL, (s, got[s], ref[s])


pytestmark = pytest.mark.slow  # multi-node MPI runs


@pytest.mark.parametrize("name,ref", [("two", "one5"), ("three", "one6"), ("two_flat", "one5")])
def test_losses_agree_with_one_node(runs, name, ref):
    _assert_losses_agree(runs[name], runs[ref])


def test_bytes_to_other_nodes(runs):
    p = _param_bytes(runs["two"])
    two = end_record(read_metrics(runs["two"]))
    flat = end_record(read_metrics(runs["two_flat"]))
    three = end_record(read_metrics(runs["three"]))
    # two-level: one replica's all-reduce per node, 2 (m - 1)/m P: P for 2 nodes
    assert two["bytes_to_other_nodes_per_step_by_node"] == [p, p]
    assert two["bytes_to_other_nodes_per_step"][0] == 0              # Node Zero: none
    # three nodes of 1, 3, 1 workers: each owns a third, whatever its workers
    assert all(abs(b - 4 / 3 * p) <= 16 for b in three["bytes_to_other_nodes_per_step_by_node"])
    # the flat exchange: each worker sends its half of the others' slices and its slice to
    # the other node's 2 workers: twice as much per node with 2 workers a node
    assert all(abs(b - 2 * p) <= 16 for b in flat["bytes_to_other_nodes_per_step_by_node"])
    one = end_record(read_metrics(runs["one5"]))
    assert one["bytes_to_other_nodes_per_step"] == [0] * 5


def test_resume_same_layout_is_bitwise(runs, tiny_dataset, tmp_path):
    run_dir = str(tmp_path / "resumed")
    _ok(run_hosts(TWO, *tiny_args(tiny_dataset, run_dir, "--stop-at", 10)))
    _ok(run_hosts(TWO, *tiny_args(tiny_dataset, run_dir, "--resume", "auto")))
    assert step_losses(read_metrics(run_dir)) == step_losses(read_metrics(runs["two"]))
    a = _state(os.path.join(runs["two"], "checkpoint_step_20.h5"))
    b = _state(os.path.join(run_dir, "checkpoint_step_20.h5"))
    for g in a:
        for k in a[g]:
            assert np.array_equal(a[g][k], b[g][k]), (g, k)


@pytest.mark.parametrize("first,second", [(TWO, 5), (5, TWO)])
def test_resume_across_layouts(runs, tiny_dataset, tmp_path, first, second):
    run_dir = str(tmp_path / "moved")
    for how, extra in [(first, ("--stop-at", 10)), (second, ("--resume", "auto"))]:
        args = tiny_args(tiny_dataset, run_dir, *extra)
        _ok(run_train(how, *args) if isinstance(how, int) else run_hosts(how, *args))
    records = read_metrics(run_dir)
    assert any(r.get("event") == "resume" and r["step"] == 10 for r in records)
    _assert_losses_agree(run_dir, runs["one5"])


def test_show_topology_names_hosts(tiny_dataset, tmp_path):
    proc = _ok(run_hosts(TWO, *tiny_args(tiny_dataset, str(tmp_path / "t")), "--show-topology"))
    assert "nodea" in proc.stdout and "nodeb" in proc.stdout, proc.stdout


def _other_node_view(tmp_path, dataset, replacement):
    """The command line of a 2-node run where nodeb sees `replacement` (a file, or None: no
    file) at the path of `dataset`: its ranks run in a mount namespace of their own with
    another directory bound over the dataset's (root only; skipped elsewhere)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs unshare -m (root) to give one logical node another file")
    other = tmp_path / "other"
    other.mkdir()
    if replacement is not None:
        shutil.copyfile(replacement, other / os.path.basename(dataset))
    here = os.path.dirname(dataset)
    train = [sys.executable, "-m", "mpitrain", "train",
             *map(str, tiny_args(dataset, str(tmp_path / "run"), "--max-steps", 2))]
    inner = f"mount --bind {other} {here} && exec " + " ".join(train)
    return [mpirun_or_skip(), "-launcher", "fork", "-hosts", "nodea:3,nodeb:2", "-n", "3",
            *train, ":", "-n", "2", "unshare", "-m", "sh", "-c", inner]


def _different_dataset(tmp_path):
    from test_train_support import write_text_corpus

    corpus = write_text_corpus(str(tmp_path / "corpus2"), seed=8)
    out = str(tmp_path / "tiny2.h5")
    _ok(subprocess.run([sys.executable, "-m", "mpitrain", "prepare", "--data", corpus, "--out",
                        out, "--vocab-size", "300", "--seq-len", "16", "--val-fraction", "0.2",
                        "--quiet"], env=_env(), capture_output=True, text=True, timeout=120))
    return out


@pytest.mark.parametrize("case", ["missing", "different"])
def test_dataset_checked_on_every_node(tiny_dataset, tmp_path, case):
    replacement = None if case == "missing" else _different_dataset(tmp_path)
    cmd = _other_node_view(tmp_path, tiny_dataset, replacement)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("mpitrain: error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "on node nodeb" in lines[0]
    assert ("no such file" if case == "missing" else "differs from Node Zero's") in lines[0]


def test_dataset_without_checksum_attribute(tiny_dataset, tmp_path):
    """A file written before the checksum attribute: the nodes compare what they compute."""
    old = str(tmp_path / "old.h5")
    with open(tiny_dataset, "rb") as a, open(old, "wb") as b:
        b.write(a.read())
    with h5py.File(old, "a") as f:
        assert "tokens_sha256" in f.attrs
        del f.attrs["tokens_sha256"]   # as the format-1 writer left it: no attribute checksum
        del f.attrs["attrs_crc32"]
        f.attrs["format_version"] = np.int64(1)
    _ok(run_hosts(TWO, *tiny_args(old, str(tmp_path / "run"), "--max-steps", 2)))
