"""`mpitrain inspect --sequence K`, `--vocab` and `--verify` on datasets, through the real
command line. References read the HDF5 arrays directly with h5py (not through Dataset or
Tokenizer), following docs/FORMATS.md."""
import json

import h5py
import numpy as np
import pytest

from conftest import assert_user_error, run_cli, write_corpus
from test_checkpoint import TOK, _save
from mpitrain.tokenizer import escape_token
from mpitrain.h5attrs import attrs_crc

pytestmark = pytest.mark.slow  # the command line in subprocesses

SEQ_LEN = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    files = {"a.txt": "the cat and the hat\n" * 20, "b.txt": "the end, the end.\tÜ\n" * 10}
    d = write_corpus(root / "c", files)
    out = root / "ds.h5"
    assert run_cli("prepare", "--data", d, "--out", out, "--seq-len", SEQ_LEN,
                   "--val-fraction", 0.5, "--quiet").returncode == 0
    return out


def _ref(path):
    """(streams {"train","val": ids}, token bytes by id) straight from the file's arrays."""
    with h5py.File(path, "r") as f:
        tokens = f["tokens"][()]
        streams = {s: np.concatenate([tokens[a:b] for a, b in f[f"splits/{s}/ranges"][()]])
                   for s in ("train", "val")}
        raw, off = f["vocab/token_bytes"][()].tobytes(), f["vocab/token_offsets"][()]
    return streams, [raw[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def test_sequence_decodes_the_training_window(dataset):
    streams, table = _ref(dataset)
    n = (streams["train"].size - 1) // SEQ_LEN
    for k in (0, 3, n - 1):
        p = run_cli("inspect", dataset, "--sequence", k, "--json")
        assert p.returncode == 0, p.stderr
        w = json.loads(p.stdout)
        ref = streams["train"][k * SEQ_LEN:k * SEQ_LEN + SEQ_LEN + 1]
        assert w["ids"] == ref.tolist() and len(w["ids"]) == SEQ_LEN + 1
        assert w["text"] == b"".join(table[i] for i in ref).decode("utf-8")
        assert [bytes.fromhex(b) for b in w["token_bytes"]] == [table[i] for i in ref]
        assert w["tokens"] == [table[i].decode("utf-8", "replace") for i in ref]
        assert (w["window"], w["windows"], w["start"], w["split"]) == (k, n, k * SEQ_LEN, "train")
    # consecutive windows overlap by exactly one token (stride seq_len)
    w0 = json.loads(run_cli("inspect", dataset, "--sequence", 0, "--json").stdout)
    w1 = json.loads(run_cli("inspect", dataset, "--sequence", 1, "--json").stdout)
    assert w0["ids"][-1] == w1["ids"][0]
    # the validation split on request
    v = json.loads(run_cli("inspect", dataset, "--sequence", 2, "--split", "val", "--json").stdout)
    assert v["ids"] == streams["val"][2 * SEQ_LEN:3 * SEQ_LEN + 1].tolist()
    # text form: the ids in order, one line per token, and the decoded text
    p = run_cli("inspect", dataset, "--sequence", 3)
    assert p.returncode == 0, p.stderr
    ref = streams["train"][3 * SEQ_LEN:4 * SEQ_LEN + 1]
    assert f"train window 3 of {n}" in p.stdout
    assert "  " + " ".join(f"{x:>6}" for x in ref) in p.stdout.splitlines()
    text = b"".join(table[i] for i in ref).decode("utf-8")
    assert ["  | " + line for line in text.split("\n")] == p.stdout.split("text:\n")[1].splitlines()


def test_sequence_out_of_range_and_wrong_files(dataset, tmp_path):
    streams, _ = _ref(dataset)
    n = (streams["train"].size - 1) // SEQ_LEN
    for k in (n, -1, 10 ** 9):
        assert_user_error(run_cli("inspect", dataset, "--sequence", k),
                          f"has {n} windows (0 to {n - 1})")
    ckpt = tmp_path / "checkpoint_step_7.h5"
    _save(ckpt)
    assert_user_error(run_cli("inspect", ckpt, "--sequence", 0),
                      "--sequence needs a dataset (made by `mpitrain prepare`)")
    assert_user_error(run_cli("inspect", dataset, "--sequence", 0, "--verify"),
                      "not allowed with argument")
    assert_user_error(run_cli("inspect", dataset, dataset, "--sequence", 0), "takes one file")
    assert_user_error(run_cli("inspect", tmp_path / "none.h5", "--sequence", 0), "no such file")


def test_vocab_lists_every_token_with_its_counts(dataset):
    streams, table = _ref(dataset)
    V = len(table)
    train = np.bincount(streams["train"], minlength=V)
    val = np.bincount(streams["val"], minlength=V)
    p = run_cli("inspect", dataset, "--vocab", "--json")
    assert p.returncode == 0, p.stderr
    v = json.loads(p.stdout)
    rows = v["tokens"]
    assert v["vocab_size"] == V and v["listed"] == V and len(rows) == V
    assert sorted(r["id"] for r in rows) == list(range(V))
    for r in rows:
        i = r["id"]
        assert (r["train"], r["val"], r["count"]) == (train[i], val[i], train[i] + val[i])
    # most frequent first, ties by id
    assert [r["id"] for r in rows] == sorted(range(V), key=lambda i: (-(train[i] + val[i]), i))
    assert v["total_tokens"] == streams["train"].size + streams["val"].size
    # --json holds real strings (not vocab.txt escapes) and the exact bytes in hex
    by_id = {r["id"]: r["token"] for r in rows}
    assert by_id[0] == "<|endoftext|>" and by_id[1 + ord("\n")] == "\n"
    assert by_id[1 + ord("\t")] == "\t"
    assert all(by_id[i] == table[i].decode() for i in range(257, V))  # plain words
    assert all(bytes.fromhex(r["bytes"]) == table[r["id"]] for r in rows)
    assert by_id[1 + 0x80] == "\ufffd"   # a lone continuation byte is no text
    # --top N: the N most frequent; text form one line per token
    p = run_cli("inspect", dataset, "--vocab", "--top", 3)
    assert p.returncode == 0, p.stderr
    body = [line for line in p.stdout.splitlines() if not line.startswith("#")]
    assert len(body) == 3
    for line, r in zip(body, rows[:3]):
        assert line.split()[:4] == [str(r["id"]), str(r["count"]), str(r["train"]), str(r["val"])]
        assert line.endswith('"' + escape_token(bytes.fromhex(r["bytes"])) + '"')
    assert "the file stores no counts" in p.stdout
    assert_user_error(run_cli("inspect", dataset, "--vocab", "--top", -1), "--top must be >= 0")


def test_vocab_of_a_checkpoint_and_of_a_foreign_file(tmp_path):
    ckpt = tmp_path / "checkpoint_step_7.h5"
    _save(ckpt)
    v = json.loads(run_cli("inspect", ckpt, "--vocab", "--json").stdout)
    assert v["format"] == "mpitrain-checkpoint" and v["counts"] is None
    assert [r["id"] for r in v["tokens"]] == list(range(TOK.vocab_size))
    assert [r["token"] for r in v["tokens"][-3:]] == ["hello", " world", " the"]
    p = run_cli("inspect", ckpt, "--vocab", "--top", 2)
    assert p.returncode == 0, p.stderr
    assert [line for line in p.stdout.splitlines() if not line.startswith("#")] == \
        ['        0  "<|endoftext|>"', '        1  "\\x00"']
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    assert_user_error(run_cli("inspect", other, "--vocab"), "no 'format' attribute")


def test_verify_a_dataset(dataset, tmp_path):
    p = run_cli("inspect", "--verify", dataset)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{dataset}: ok\n", "")
    # a root count that disagrees with the arrays
    wrong = tmp_path / "wrong.h5"
    wrong.write_bytes(dataset.read_bytes())
    with h5py.File(wrong, "r+") as f:
        f.attrs["train_windows"] = np.int64(f.attrs["train_windows"] + 1)
    p = run_cli("inspect", "--verify", wrong)   # caught by the root attributes' checksum
    assert p.returncode == 1 and "root attributes fail their checksum" in p.stdout
    with h5py.File(wrong, "r+") as f:             # ... and, checksum made consistent, by the count
        f.attrs["attrs_crc32"] = np.uint32(attrs_crc(f.attrs))
    p = run_cli("inspect", "--verify", wrong)
    assert p.returncode == 1 and "DAMAGED: root attribute train_windows is" in p.stdout
    # a token id outside the vocabulary
    bad = tmp_path / "bad.h5"
    bad.write_bytes(dataset.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["tokens"][0] = f.attrs["vocab_size"]
    p = run_cli("inspect", "--verify", bad, "--json")
    res = json.loads(p.stdout)
    assert p.returncode == 1 and res[0]["status"] == 1
    assert ">= vocabulary size" in res[0]["problems"][0]


def test_dataset_with_a_broken_vocabulary_pattern(dataset, tmp_path):
    # /vocab's attributes, the pattern included, are under a checksum (vocabulary format 2): a
    # changed pattern is reported like any other damage, never compiled into a traceback.
    bad = tmp_path / "pattern.h5"
    bad.write_bytes(dataset.read_bytes())
    with h5py.File(bad, "r+") as f:
        f["vocab"].attrs["pattern"] = "(unclosed"
    p = run_cli("inspect", bad)
    assert p.returncode == 1 and p.stderr == "" and "DAMAGED: " in p.stdout
    assert "attributes fail their checksum" in p.stdout
    p = run_cli("inspect", "--verify", bad)
    assert p.returncode == 1 and "attributes fail their checksum" in p.stdout
    assert_user_error(run_cli("inspect", bad, "--sequence", 0), "checksum")
    assert_user_error(run_cli("inspect", bad, "--vocab"), "checksum")


def test_summary_of_a_dataset_missing_root_attributes(dataset, tmp_path):
    # An older file (format 1: no checksum over the root attributes) without some descriptive
    # root attributes still prints ("?").
    older = tmp_path / "older.h5"
    older.write_bytes(dataset.read_bytes())
    with h5py.File(older, "r+") as f:
        for key in ("bytes", "coverage", "files", "attrs_crc32"):
            del f.attrs[key]
        f.attrs["format_version"] = np.int64(1)
    p = run_cli("inspect", older, "--no-tree")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert "from ? sources (? bytes," in p.stdout and "coverage     ? of pre-tokens" in p.stdout
    assert json.loads(run_cli("inspect", older, "--json").stdout)["summary"]["bytes"] is None
