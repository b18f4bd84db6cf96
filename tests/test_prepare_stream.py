"""Streaming prepare: pieces cut where nothing spans them, counts spilled and merged exactly,
and the same file whatever the memory budget."""
import collections
import re

import numpy as np
from hypothesis import given, settings, strategies as st

import pytest

from conftest import run_cli, write_corpus
from mpitrain import corpus, pretoken_counts, prepare as prepare_mod
from mpitrain.prepare import FIXED_BYTES, Options, parse_size, prepare
from mpitrain.tokenizer import PATTERN, select_pretokens

REGEX = re.compile(PATTERN)
# bytes that stress the cut rule: ASCII and Unicode whitespace, letters, digits, "_",
# punctuation, multi-byte letters, invalid UTF-8
PARTS = [b"\n", b"\n\n", b" ", b"\t", b"\r\n", "\u00a0".encode(), "\u3000".encode(), b"a",
         b"Zeta", b"7", b"_", b"x_1", b"::", "\u00e9t\u00e9".encode(), "\U0001F600".encode(),
         b"\xff", b"\xc3", b"\xe2\x82", b"\n\xc3\xa9"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(PARTS), max_size=200), st.integers(1, 40))
def test_pieces_decode_and_pretokenize_like_the_whole(tmp_path_factory, parts, piece_bytes):
    data = b"".join(parts)
    path = tmp_path_factory.mktemp("p") / "f.txt"
    path.write_bytes(data)
    src = corpus.Source("f.txt", len(data), str(path))
    for pieces in (list(corpus.source_pieces(src, piece_bytes=piece_bytes)),
                   list(corpus.source_pieces(src, data, piece_bytes=piece_bytes))):
        assert b"".join(pieces) == data
        whole, replaced = corpus.decode(data)
        decoded = [corpus.decode(p) for p in pieces]
        assert "".join(t for t, _ in decoded) == whole
        assert sum(r for _, r in decoded) == replaced
        assert [t for text, _ in decoded for t in REGEX.findall(text)] == REGEX.findall(whole)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["ab", "b", "é", "xyz", " q", "zz", "ab"]),
                         max_size=30), max_size=8),
       st.integers(0, 8))
def test_spilled_counts_merge_to_the_exact_totals_and_vocabulary(tmp_path_factory, chunks, n):
    c = pretoken_counts.Counts(0, str(tmp_path_factory.mktemp("runs")))
    c.limit = 2                      # spill after every few new pre-tokens
    for chunk in chunks:
        c.add(chunk)
    c.spill()
    expect = collections.Counter(t for chunk in chunks for t in chunk)
    merged = list(pretoken_counts.merged_runs(c.runs))
    assert merged == sorted((k.encode(), v) for k, v in expect.items())
    tally = pretoken_counts.Tally()
    assert pretoken_counts.top_pretokens(tally.watch(iter(merged)), n) == \
        select_pretokens(expect, n)
    assert (tally.distinct, tally.total) == (len(expect), sum(expect.values()))
    c.remove_runs()


def test_any_memory_budget_gives_the_same_bytes(tmp_path):
    rng = np.random.default_rng(0)
    words = [f"w{i}" + "é" * (i % 3) for i in range(3000)]
    files = {f"d{k}.txt": "\n".join(" ".join(words[j] for j in rng.zipf(1.3, 40) % 3000)
                                    for _ in range(200)) for k in range(6)}
    d = write_corpus(tmp_path / "c", files)
    outs = []
    for budget in (0, 1, 200 << 10):     # default, everything spilled, a few runs
        out = tmp_path / f"ds{budget}.h5"
        s = prepare(Options(data=d, out=str(out), vocab_size=600, quiet=True,
                            memory_budget=budget))
        assert s["spilled"] == (budget != 0)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    assert not [p for p in tmp_path.iterdir() if ".prepare-" in p.name]   # scratch removed


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["ab", "b", "é", "xyz", " q", "zz", "\u3000"]),
                         max_size=30), max_size=8))
def test_count_ids_name_each_pretoken_in_the_table(tmp_path_factory, chunks):
    c = pretoken_counts.Counts(1 << 20, str(tmp_path_factory.mktemp("runs")))
    got = [c.add(chunk) for chunk in chunks]
    keys = c.keys()
    assert keys == list(dict.fromkeys(t for chunk in chunks for t in chunk))  # first-seen order
    for chunk, ids in zip(chunks, got):
        assert ids.dtype == np.uint32 and [keys[i] for i in ids.tolist()] == chunk
    expect = collections.Counter(t for chunk in chunks for t in chunk)
    assert c.counts().tolist() == [expect[k] for k in keys]
    assert list(c.items()) == sorted((k.encode(), v) for k, v in expect.items())
    assert not c.runs


def _zipf_corpus(root, n_files=6):
    rng = np.random.default_rng(0)
    words = [f"w{i}" + "é" * (i % 3) for i in range(3000)]
    return write_corpus(root, {
        f"d{k}.txt": "\n".join(" ".join(words[j] for j in rng.zipf(1.3, 40) % 3000)
                               for _ in range(200)) for k in range(n_files)})


def test_encode_reads_pass_one_ids_unless_the_table_spilled(tmp_path, monkeypatch):
    d = _zipf_corpus(tmp_path / "c")
    real_encode, real_encode_ids = prepare_mod._encode, prepare_mod._encode_ids
    used = []
    monkeypatch.setattr(prepare_mod, "_encode",
                        lambda *a: used.append("text") or real_encode(*a))
    monkeypatch.setattr(prepare_mod, "_encode_ids",
                        lambda *a: used.append("ids") or real_encode_ids(*a))
    outs = []
    for budget, path in ((0, "ids"), (1, "text")):
        used.clear()
        out = tmp_path / f"ds{budget}.h5"
        prepare(Options(data=d, out=str(out), vocab_size=600, quiet=True, memory_budget=budget))
        assert used == [path]
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert not [p for p in tmp_path.iterdir() if ".prepare-" in p.name]


@pytest.mark.slow
def test_mpirun_2_keeps_its_ids_when_only_the_merge_spills(tmp_path, mpirun):
    # A budget whose table holds each rank's distinct pre-tokens but not their union: the
    # ranks never spill while counting (they encode from their ids) and rank 0 merges runs.
    d = _zipf_corpus(tmp_path / "c", n_files=2)    # one file a rank (same sizes)
    distinct = [len(set(REGEX.findall(p.read_text(encoding="utf-8"))))
                for p in sorted((tmp_path / "c").iterdir())]
    limit = max(distinct)                         # table entries (> 102: the minimum)
    assert limit > 200 and sum(distinct) > limit
    budget = FIXED_BYTES + limit * pretoken_counts.ENTRY_BYTES
    outs = []
    for launcher, extra in (((), ()), ((mpirun, "-n", "2"), ("--memory-budget", budget))):
        out = tmp_path / f"ds{len(outs)}.h5"
        p = run_cli("prepare", "--data", d, "--out", out, "--vocab-size", 600, *extra,
                    launcher=launcher)
        assert p.returncode == 0, p.stderr
        assert ("spilled to disk" in p.stdout) == bool(extra)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert not [p for p in tmp_path.iterdir() if ".prepare-" in p.name]


def test_parse_size():
    assert parse_size("800M") == 800 << 20 and parse_size("1.5G") == 3 << 29
    assert parse_size("123") == 123 and parse_size("4gib") == 4 << 30
