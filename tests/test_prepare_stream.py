"""Streaming prepare: pieces cut where nothing spans them, counts spilled and merged exactly,
and the same file whatever the memory budget."""
import collections
import re

import numpy as np
from hypothesis import given, settings, strategies as st

from conftest import write_corpus
from mpitrain import corpus, pretoken_counts
from mpitrain.prepare import Options, parse_size, prepare
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


def test_parse_size():
    assert parse_size("800M") == 800 << 20 and parse_size("1.5G") == 3 << 29
    assert parse_size("123") == 123 and parse_size("4gib") == 4 << 30
