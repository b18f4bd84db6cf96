"""`mpitrain prepare` through the real command line: file contents against an independent
reference, MPI byte equality, atomic output, and every bad input."""
import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import CORPUS_FILES, assert_user_error, ref_val_documents, run_cli, write_corpus
from mpitrain.prepare import choose_split, partition
from mpitrain.tokenizer import PATTERN, Tokenizer


def reference(files, vocab_size):
    """Expected (names, texts, pretokens in id order) straight from the definition."""
    names = sorted(files, key=lambda n: n.split("/"))
    raw = [files[n].encode() if isinstance(files[n], str) else files[n] for n in names]
    keep = [(n, r) for n, r in zip(names, raw) if b"\x00" not in r]
    texts = [r.decode("utf-8", errors="replace") for _, r in keep]
    counts = collections.Counter(t for text in texts for t in re.findall(PATTERN, text))
    multi = sorted((t for t in counts if len(t.encode()) > 1),
                   key=lambda t: (-counts[t], t.encode()))
    return [n for n, _ in keep], [r for _, r in keep], texts, multi[:vocab_size - 257]


def test_prepare_writes_what_the_definition_says(tmp_path, corpus_dir):
    files = dict(CORPUS_FILES)
    files["bin/blob.bin"] = b"\x89PNG\x00\x01\x02"
    files["latin1.txt"] = b"caf\xe9 na\xefve \xff\xfe ok\n"
    files["b-x.txt"] = "after b/ by components, before it as plain strings\n"
    write_corpus(corpus_dir, {k: files[k] for k in ("bin/blob.bin", "latin1.txt", "b-x.txt")})
    out = tmp_path / "ds.h5"
    proc = run_cli("prepare", "--data", corpus_dir, "--out", out, "--vocab-size", 400,
                   "--seq-len", 8, "--val-fraction", 0.3)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars when stderr is not a terminal
    names, raw, texts, pretokens = reference(files, 400)
    tok = Tokenizer.from_file(out)
    assert tok.pretokens == pretokens
    assert tok.vocab_size < 400 and "fewer than the 400 requested" in proc.stdout
    with h5py.File(out, "r") as f:
        a = dict(f.attrs)
        assert a["format"] == "mpitrain-dataset" and a["format_version"] == 2
        tokens = f["tokens"][()]
        assert tokens.dtype == np.uint16
        offsets = f["documents/offsets"][()]
        expected = [np.append(tok.encode(t), tok.eod_id) for t in texts]
        np.testing.assert_array_equal(tokens, np.concatenate(expected))
        np.testing.assert_array_equal(np.diff(offsets), [len(e) for e in expected])
        for k, text in enumerate(texts):  # every document decodes back to its text
            assert tok.decode(tokens[offsets[k]:offsets[k + 1] - 1]) == text
        assert [n.decode() for n in f["sources/name"][()]] == names
        assert f["sources/size"][()].tolist() == [len(r) for r in raw]
        assert [h.decode() for h in f["sources/sha256"][()]] == \
            [hashlib.sha256(r).hexdigest() for r in raw]
        # the raw text holds no U+FFFD of its own, so each one in the decoded text is a replacement
        assert f["sources/replaced"][()].tolist() == [t.count("\ufffd") for t in texts]
        train, val = f["splits/train/ranges"][()], f["splits/val/ranges"][()]
    assert names[:5] == ["a.txt", "b/c.txt", "b/d.md", "b/e/f.txt", "b-x.txt"]
    assert len(names) == 7  # 7 text files; round(7 * 0.3) = 2 held out: blocks 0-3 and 4-6
    held = ref_val_documents(np.diff(offsets).tolist(), 0.3)
    assert len(held) == 2 and held[0] < 4 <= held[1]
    np.testing.assert_array_equal(
        np.concatenate([tokens[a:b] for a, b in val]),
        np.concatenate([tokens[offsets[i]:offsets[i + 1]] for i in held]))
    np.testing.assert_array_equal(
        np.concatenate([tokens[a:b] for a, b in train]),
        np.concatenate([tokens[offsets[i]:offsets[i + 1]] for i in range(7) if i not in held]))
    assert a["files"] == 7 and a["binary_files_skipped"] == 1
    assert a["invalid_utf8_files"] == 1 and a["replacement_characters"] == 4
    assert a["bytes"] == sum(len(r) for r in raw)
    assert a["tokens"] == len(tokens) and a["text_tokens"] == len(tokens) - 7
    assert a["train_tokens"] + a["val_tokens"] == len(tokens)
    assert a["train_documents"] == 5 and a["val_documents"] == 2
    pre = [t for text in texts for t in re.findall(PATTERN, text)]
    fallback = [t for t in pre if len(t.encode()) > 1 and t not in tok.ids]
    assert a["pretokens"] == len(pre) and a["pretokens_byte_fallback"] == len(fallback)
    # ratios of integers in float64 (pytest.approx's default rel 1e-6: a different count would
    # change them by far more)
    assert a["coverage"] == pytest.approx(1 - len(fallback) / len(pre))
    assert a["tokens_per_byte"] == pytest.approx((len(tokens) - 7) / a["bytes"])
    assert a["seq_len"] == 8 and a["vocab_size"] == tok.vocab_size
    # vocab.txt beside the output holds the same vocabulary
    vt = Tokenizer.from_file(tmp_path / "ds.vocab.txt")
    assert vt.pretokens == tok.pretokens
    assert sorted(os.listdir(tmp_path)) == ["corpus", "ds.h5", "ds.vocab.txt"]
    for line in ("files        7 text", "1 binary skipped", "coverage", "tokens per byte"):
        assert line in proc.stdout


@pytest.mark.slow
def test_vocab_is_truncated_by_count(tmp_path, corpus_dir):
    out = tmp_path / "small.h5"
    assert run_cli("prepare", "--data", corpus_dir, "--out", out, "--vocab-size", 270,
                   "--quiet").returncode == 0
    _, _, _, pretokens = reference(CORPUS_FILES, 270)
    tok = Tokenizer.from_file(out)
    assert tok.vocab_size == 270 and tok.pretokens == pretokens


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["many files", "fewer files than ranks"])
def test_mpirun_3_is_byte_identical(tmp_path, corpus_dir, mpirun, shape):
    if shape == "many files":
        extra = {f"many/doc{i:02d}.txt": f"document {i} " + "word " * i + "\n" for i in range(20)}
        write_corpus(corpus_dir, extra)
    else:
        corpus_dir = write_corpus(tmp_path / "two", {"a.txt": "one file", "b/c.txt": "two files"})
    one, three = tmp_path / "one.h5", tmp_path / "three.h5"
    p1 = run_cli("prepare", "--data", corpus_dir, "--out", one, "--vocab-size", 290, "--quiet")
    assert p1.returncode == 0, p1.stderr
    p3 = run_cli("prepare", "--data", corpus_dir, "--out", three, "--vocab-size", 290, "--quiet",
                 launcher=(mpirun, "-n", "3"))
    assert p3.returncode == 0, p3.stderr
    assert one.read_bytes() == three.read_bytes()
    assert (tmp_path / "one.vocab.txt").read_bytes() == (tmp_path / "three.vocab.txt").read_bytes()
    assert p3.stdout.count("wrote") == 1  # only rank 0 reports


@pytest.mark.slow
def test_mpirun_error_ends_every_rank(tmp_path, mpirun):
    p = run_cli("prepare", "--data", tmp_path / "missing", "--out", tmp_path / "x.h5",
                launcher=(mpirun, "-n", "3"), timeout=60)
    assert p.returncode != 0
    ours = [l for l in p.stderr.splitlines() if l.startswith("mpitrain: error:")]
    assert len(ours) == 1 and "does not exist" in ours[0]
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_mpirun_read_error_on_the_last_rank_ends_every_rank(tmp_path, mpirun):
    # /proc/self/mem is a "regular file" that fails with EIO when read from offset 0: an
    # unreadable source that even root cannot read. Sorted last and empty, rank 2 owns it.
    d = write_corpus(tmp_path / "c", {f"f{i}.txt": f"file {i} text\n" for i in range(5)})
    os.symlink("/proc/self/mem", os.path.join(d, "zzz.txt"))
    p = run_cli("prepare", "--data", d, "--out", tmp_path / "x.h5",
                launcher=(mpirun, "-n", "3"), timeout=60)
    assert p.returncode == 2
    ours = [l for l in p.stderr.splitlines() if l.startswith("mpitrain: error:")]
    assert len(ours) == 1 and "cannot read" in ours[0] and "zzz.txt" in ours[0]
    assert not (tmp_path / "x.h5").exists()


def test_single_document_splits_at_the_tail(tmp_path):
    d = write_corpus(tmp_path / "one", {"only.txt": "word " * 100})
    out = tmp_path / "one.h5"
    assert run_cli("prepare", "--data", d, "--out", out, "--val-fraction", 0.1,
                   "--quiet").returncode == 0
    with h5py.File(out, "r") as f:
        n = f["tokens"].shape[0]
        assert f["splits/val/ranges"][()].tolist() == [[n - int(np.ceil(n * 0.1)), n]]
        assert f["splits/train/ranges"][()].tolist() == [[0, n - int(np.ceil(n * 0.1))]]


@pytest.mark.slow
def test_default_corpus_is_the_stdlib(tmp_path):
    # --out defaults to hdf5_data/default.h5 under the current directory (created if missing)
    proc = run_cli("prepare", "--quiet", "--vocab-size", 2000, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "hdf5_data" / "default.h5"
    with h5py.File(out, "r") as f:
        assert f.attrs["corpus"] == "python-stdlib"
        assert f.attrs["python_version"] == "%d.%d.%d" % sys.version_info[:3]
        names = [n.decode() for n in f["sources/name"][()]]
        assert f.attrs["bytes"] > 2_000_000
    assert "stdlib/json/decoder.py" in names and "stdlib/argparse.py" in names
    assert any(n.startswith("pydoc_topics/") for n in names)
    assert not any("/test/" in n or "/tests/" in n or "site-packages" in n for n in names)
    assert (tmp_path / "hdf5_data" / "default.vocab.txt").exists()


@pytest.mark.slow
def test_force_replaces_and_existing_is_refused(tmp_path, corpus_dir):
    out = tmp_path / "ds.h5"
    out.write_bytes(b"precious")
    p = run_cli("prepare", "--data", corpus_dir, "--out", out)
    assert_user_error(p, "use --force")
    assert out.read_bytes() == b"precious"
    assert run_cli("prepare", "--data", corpus_dir, "--out", out, "--force",
                   "--quiet").returncode == 0
    assert h5py.is_hdf5(out)


def _bad_cases(tmp_path, corpus_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = write_corpus(tmp_path / "binary", {"a.bin": b"\x00\x01", "b/c.bin": b"x\x00"})
    afile = tmp_path / "afile.txt"
    afile.write_text("text")
    return [
        (["--data", tmp_path / "nope"], "data directory does not exist"),
        (["--data", afile], "not a directory"),
        (["--data", empty], "has no files"),
        (["--data", binary], "no text files"),
        (["--data", corpus_dir, "--vocab-size", 257], "--vocab-size must be between 258"),
        (["--data", corpus_dir, "--vocab-size", 1_000_001], "--vocab-size must be between"),
        (["--data", corpus_dir, "--seq-len", 0], "--seq-len must be between 1 and"),
        (["--data", corpus_dir, "--val-fraction", 0], "--val-fraction must be in (0, 0.5]"),
        (["--data", corpus_dir, "--val-fraction", 0.6], "--val-fraction must be in (0, 0.5]"),
        (["--data", corpus_dir, "--val-fraction", "nan"], "--val-fraction must be in (0, 0.5]"),
        (["--data", corpus_dir, "--out", tmp_path / "nodir" / "x.h5"],
         "output directory does not exist"),
        (["--data", corpus_dir, "--out", tmp_path], "--out is a directory"),
        (["--data", write_corpus(tmp_path / "tiny", {"t.txt": ""})], "too small to split"),
        (["--data", corpus_dir, "--vocab-size", "many"], "invalid int value"),
    ]


@pytest.mark.slow
def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, corpus_dir):
    for args, fragment in _bad_cases(tmp_path, corpus_dir):
        work = tmp_path / "work"
        work.mkdir()
        if "--out" not in args:
            args = args + ["--out", work / "out.h5"]
        p = run_cli("prepare", *args, cwd=work)
        assert_user_error(p, fragment)
        assert os.listdir(work) == [], (args, os.listdir(work))
        shutil.rmtree(work)


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("vocab", [300, 30000])  # the .h5 fails / the vocab.txt fails
def test_disk_full_leaves_nothing(tmp_path, vocab):
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "64k"):
        pytest.skip("needs root and a mountable tmpfs")
    try:
        words = " ".join(f"w{i}x{i * 7919 % 1000}" for i in range(60000))  # ~600 kB
        d = write_corpus(tmp_path / "big", {"big.txt": words})
        p = run_cli("prepare", "--data", d, "--out", mnt / "ds.h5", "--quiet", "--vocab-size", vocab)
        assert_user_error(p, "cannot write")
        assert "No space left on device; nothing was written" in p.stderr
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_h5_tools_read_the_file(tmp_path, corpus_dir):
    if shutil.which("h5dump") is None or shutil.which("h5ls") is None:
        pytest.skip("hdf5-tools (h5dump, h5ls) not installed")
    out = tmp_path / "ds.h5"
    assert run_cli("prepare", "--data", corpus_dir, "--out", out, "--quiet").returncode == 0
    ls = subprocess.run(["h5ls", "-r", str(out)], capture_output=True, text=True, check=True)
    for path in ("/tokens", "/documents/offsets", "/splits/train/ranges", "/sources/sha256",
                 "/vocab/token_bytes"):
        assert path in ls.stdout
    dump = subprocess.run(["h5dump", "-a", "/format", str(out)], capture_output=True, text=True,
                          check=True)
    assert '"mpitrain-dataset"' in dump.stdout
    names = subprocess.run(["h5dump", "-d", "/sources/name", str(out)], capture_output=True,
                           text=True, check=True)
    assert '"b/c.txt"' in names.stdout


def test_choose_split_and_partition_rules():
    # equal documents: every one is as close to the target; ties take each block's first
    splits, docs = choose_split(np.array([5] * 10), 0.2)
    assert splits["val"].tolist() == [[0, 5], [25, 30]] and docs == {"train": 8, "val": 2}
    assert splits["train"].tolist() == [[5, 25], [30, 50]]
    # one huge document is not taken when a document near 1% of the tokens exists
    splits, docs = choose_split(np.array([10, 1000, 20, 30]), 0.01)
    assert splits["val"].tolist() == [[0, 10]] and docs == {"train": 3, "val": 1}
    splits, docs = choose_split(np.array([3, 4]), 0.01)  # at least one document held out
    assert splits["val"].tolist() == [[0, 3]] and splits["train"].tolist() == [[3, 7]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 500, size=rng.integers(2, 40))
        f = float(rng.uniform(0.01, 0.5))
        splits, _ = choose_split(lengths, f)
        ends = np.cumsum(lengths)
        held = ref_val_documents(lengths.tolist(), f)
        got = [i for i in range(len(lengths))
               if any(a <= ends[i] - lengths[i] and ends[i] <= b for a, b in splits["val"])]
        assert got == held
    owner = partition([10, 10, 10, 10, 100, 1], 3)
    assert owner.tolist() == sorted(owner.tolist()) and owner[0] == 0 and owner.max() <= 2
    assert partition([0, 0, 0], 2).tolist() == [0, 0, 1]
