"""`mpitrain inspect` on datasets and foreign files, text and --json."""
import json

import h5py
import numpy as np
import pytest

from conftest import assert_user_error, run_cli, write_corpus
from mpitrain.dataset import Dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("insp")
    files = {"a.txt": "the cat and the hat\n" * 20, "b.txt": "the end, the end.\n" * 10,
             "c.txt": "x\x00binary"}
    d = write_corpus(root / "c", files)
    out = root / "ds.h5"
    assert run_cli("prepare", "--data", d, "--out", out, "--seq-len", 4, "--val-fraction", 0.5,
                   "--quiet").returncode == 0
    return out


def test_json_summary_matches_the_file(dataset):
    p = run_cli("inspect", dataset, "--json", "--top", 5)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    s = info["summary"]
    ds = Dataset.open(dataset)
    train, val = ds.split_tokens("train"), ds.split_tokens("val")
    assert info["format"] == "mpitrain-dataset"
    assert s["vocab_size"] == ds.vocab_size and s["documents"] == 2 and s["sources"] == 2
    assert s["splits"]["train"]["tokens"] == train.size
    assert s["splits"]["val"]["tokens"] == val.size
    assert s["splits"]["train"]["windows"] == (train.size - 1) // 4
    assert s["binary_files_skipped"] == 1
    counts = np.bincount(np.concatenate([train, val]))
    top = s["most_frequent_tokens"]
    assert len(top) == 5
    assert [t["count"] for t in top] == sorted(counts, reverse=True)[:5]
    assert all(counts[t["id"]] == t["count"] for t in top)
    assert s["sample"]["ids"] == train[:5].tolist()
    assert s["sample"]["text"] == ds.tokenizer.decode(train[:5])
    # the tree lists every dataset with shape and dtype
    tree = {c["name"]: c for c in info["tree"]["children"]}
    assert tree["tokens"]["shape"] == [ds.num_tokens] and tree["tokens"]["dtype"] == "uint16"
    assert tree["tokens"]["layout"] == "contiguous" and tree["tokens"]["filters"] == []
    assert info["tree"]["attrs"]["format_version"] == 2


def test_text_output(dataset):
    p = run_cli("inspect", dataset)
    assert p.returncode == 0, p.stderr
    for fragment in ("tree:", "tokens  [", "uint16", "@format = mpitrain-dataset", "summary:",
                     "most frequent tokens:", "coverage", '" the"', "sample"):
        assert fragment in p.stdout, fragment


def test_foreign_hdf5_shows_tree_only(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("grid", data=np.zeros((4, 6), np.float32), chunks=(2, 3),
                         compression="gzip")
        f["grid"].attrs["units"] = "m"
        f["pair"] = np.dtype([("a", "<i4"), ("b", "<f8")])  # a named (committed) datatype
    p = run_cli("inspect", path)
    assert p.returncode == 0, p.stderr
    assert "no 'format' attribute" in p.stdout and "grid  [4x6] float32" in p.stdout
    assert "chunked (2, 3), filters gzip" in p.stdout and "@units = m" in p.stdout
    assert "pair  named datatype [('a', '<i4'), ('b', '<f8')]" in p.stdout
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["summary"] is None and info["tree"]["children"][0]["chunks"] == [2, 3]


def test_inspect_errors(tmp_path):
    assert_user_error(run_cli("inspect", tmp_path / "none.h5"), "no such file")
    (tmp_path / "t.h5").write_text("text")
    assert_user_error(run_cli("inspect", tmp_path / "t.h5"), "not an HDF5 file")
    assert_user_error(run_cli("inspect"), "required")


@pytest.mark.slow
def test_damaged_object_header_shows_the_rest_of_the_tree(tmp_path):
    # HDF5 (libver latest) checksums each object header: a flipped byte in /d1's header makes
    # HDF5 fail to open that object (a KeyError/RuntimeError from h5py, not an OSError).
    path = tmp_path / "hurt.h5"
    with h5py.File(path, "w", libver="latest") as f:
        for i in range(3):
            f.create_dataset(f"d{i}", data=np.arange(6, dtype=np.float32), track_times=False)
        header = h5py.h5o.get_info(f["d1"].id).addr
    raw = bytearray(path.read_bytes())
    assert raw[header:header + 4] == b"OHDR"
    raw[header + 12] ^= 0x10
    path.write_bytes(bytes(raw))
    p = run_cli("inspect", path)
    assert p.returncode == 1 and p.stderr == "", p.stderr
    assert "d0  [6] float32" in p.stdout and "d2  [6] float32" in p.stdout
    assert "d1  <unreadable: " in p.stdout and "DAMAGED: /d1: <unreadable: " in p.stdout
    info = json.loads(run_cli("inspect", path, "--json").stdout)
    assert info["damage"].startswith("/d1: ")
    assert [c["kind"] for c in info["tree"]["children"]] == ["dataset", "unreadable", "dataset"]
    assert_user_error(run_cli("inspect", path, "--vocab"), "no 'format' attribute")
    p = run_cli("inspect", "--verify", path)  # not one of ours: --verify does not judge it
    assert p.returncode == 2 and "error: not a file mpitrain writes" in p.stdout


def test_names_that_are_not_utf8(tmp_path):
    # HDF5 names are bytes; h5py hands back bytes for one that is not UTF-8. The tree shows
    # it (with U+FFFD) instead of failing on a str/bytes comparison.
    path = tmp_path / "names.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(2))
        f["x"].attrs.create(b"\xffodd", 1)
        f["x"].attrs["ok"] = 2
    p = run_cli("inspect", path)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "@ok = 2" in p.stdout and "@\ufffdodd = 1" in p.stdout
