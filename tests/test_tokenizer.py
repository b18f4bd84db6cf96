"""Tokenizer: pre-token coverage, id order, round trips (hypothesis), storage round trips."""
import collections
import re

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpitrain.errors import UserError
from mpitrain.tokenizer import (MAX_VOCAB_SIZE, PATTERN, SPECIALS, Tokenizer, escape_token,
                                unescape_token)

BENCH_RE = r" ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+"
SAMPLE = ("the cat sat on the mat. The cat's hat_is flat: 12 cats, 3 hats!\r\n"
          "日本語 and 日本 😀😀 café café naïve\t\ttabs\n" * 3)


def counts_of(text):
    return collections.Counter(re.findall(PATTERN, text))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_counts(counts_of(SAMPLE), 300)


@pytest.mark.slow
def test_pattern_covers_every_code_point():
    # Every code point (surrogates aside), alone and after a space, is matched whole: findall
    # can then never skip a character. The benchmark regex misses exactly "_".
    rx, bench = re.compile(PATTERN), re.compile(BENCH_RE)
    missed_by_bench = []
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        assert rx.fullmatch(c), hex(cp)
        assert "".join(rx.findall(" " + c + "a")) == " " + c + "a", hex(cp)
        if not bench.fullmatch(c):
            missed_by_bench.append(c)
    assert missed_by_bench == ["_"]


def test_pattern_agrees_with_benchmark_where_it_covers():
    text = "Hello, world! 123 abc\n\n  x  y\t!?"
    assert re.findall(PATTERN, text) == re.findall(BENCH_RE, text)


def test_id_order_specials_bytes_then_by_count_ties_by_bytes():
    counts = {"aa": 5, "zz": 5, "b": 100, " é": 7, "é": 9, "ab": 1, "x": 3, "日": 5}
    tok = Tokenizer.from_counts(counts, len(SPECIALS) + 256 + 10)
    assert tok.specials == SPECIALS and tok.eod_id == 0
    for b in range(256):
        assert tok.token_bytes(len(SPECIALS) + b) == bytes([b])
    # independent reference: multi-byte (UTF-8) tokens sorted by (-count, bytes)
    ref = sorted((t for t in counts if len(t.encode()) > 1), key=lambda t: (-counts[t], t.encode()))
    assert tok.pretokens == ref == ["é", " é", "aa", "zz", "日", "ab"]
    assert tok.vocab_size == len(SPECIALS) + 256 + 6  # fewer distinct than room: smaller


def test_vocab_truncates_and_is_deterministic():
    counts = counts_of(SAMPLE)
    shuffled = dict(sorted(counts.items(), key=lambda kv: hash(kv[0])))
    a = Tokenizer.from_counts(counts, 257 + 5)
    b = Tokenizer.from_counts(shuffled, 257 + 5)
    assert a.pretokens == b.pretokens and a.vocab_size == 262


@pytest.mark.parametrize("size", [0, 256, 257, MAX_VOCAB_SIZE + 1])
def test_vocab_size_out_of_range(size):
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.from_counts({"ab": 1}, size)


@pytest.mark.parametrize("text", [
    "", "\r\n", "a\r\nb\r\n", "\x00\x01\x1f\x7f", "😀👍🏽🇩🇪", "日本語の文章", "e\u0301",
    "__init__", " _x_ ", "\ufeffBOM", "\u2028line\u2029sep", "\U0010ffff", "tab\tvt\x0bff\x0c",
])
def test_round_trip_hard_cases(tok, text):
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    assert tok.decode(ids) == text


def test_special_text_never_becomes_special(tok):
    text = "<|endoftext|> and <|endoftext|>"
    ids = tok.encode(text)
    assert tok.eod_id not in ids.tolist()
    assert tok.decode(ids) == text
    assert tok.decode([tok.eod_id]) == "<|endoftext|>"


def test_lone_surrogate_is_refused(tok):
    with pytest.raises(ValueError, match=r"lone surrogate U\+D800 at position 2"):
        tok.encode("ab\ud800c")


def test_encode_uses_vocab_entries_and_byte_fallback(tok):
    # " cat" is in the vocabulary (frequent); an unseen word falls back to its UTF-8 bytes.
    assert tok.encode(" cat").tolist() == [tok.ids[" cat"]]
    unseen = " zebra\u00e9"
    assert unseen not in tok.ids
    assert tok.encode(unseen).tolist() == [tok.byte_offset + b for b in unseen.encode()]


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_property(text):
    # The vocabulary comes from SAMPLE; hypothesis text is anything valid (no surrogates).
    tok = Tokenizer.from_counts(counts_of(SAMPLE), 400)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=30), st.text())
def test_round_trip_with_vocab_built_from_random_text(docs, text):
    tok = Tokenizer.from_counts(counts_of("".join(docs)), 1000)
    for t in docs + [text]:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert ids.size == 0 or (ids.min() >= tok.num_specials and ids.max() < tok.vocab_size)


@settings(max_examples=300, deadline=None)
@given(st.binary())
def test_escape_round_trip_any_bytes(b):
    s = escape_token(b)
    assert "\n" not in s and "\r" not in s
    assert unescape_token(s) == b


def test_escape_is_readable():
    assert escape_token(" the".encode()) == " the"
    assert escape_token("日本".encode()) == "日本"
    assert escape_token(b"\n\t\\") == "\\n\\t\\\\"
    assert escape_token(b"\xff") == "\\xff"
    assert escape_token("\u2028".encode()) == "\\xe2\\x80\\xa8"


def _tricky_tokenizer():
    pretokens = ["\n\n", "\\n", "\\x41", " the", "\r\n", "日本", "\u2028x", "<|endoftext|>", "  "]
    return Tokenizer(pretokens)


def test_vocab_txt_round_trip(tmp_path):
    tok = _tricky_tokenizer()
    path = tmp_path / "vocab.txt"
    tok.save_txt(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0].startswith("#mpitrain-vocab ")
    assert len(lines) == 1 + tok.vocab_size + 1  # header, one line per id, final newline
    back = Tokenizer.from_file(path)
    assert back.pretokens == tok.pretokens and back.specials == tok.specials
    assert back.pattern == tok.pattern and back.vocab_size == tok.vocab_size
    # text spelling the special never becomes id 0 (it is cut into ordinary pre-tokens)
    ids = back.encode("<|endoftext|>").tolist()
    assert back.eod_id not in ids and back.decode(ids) == "<|endoftext|>"


def test_hdf5_round_trip(tmp_path):
    tok = _tricky_tokenizer()
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        tok.to_hdf5(f.create_group("vocab"))
    back = Tokenizer.from_file(path)
    assert back.pretokens == tok.pretokens
    assert [back.token_bytes(i) for i in range(back.vocab_size)] == \
        [tok.token_bytes(i) for i in range(tok.vocab_size)]


def test_from_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such vocabulary file"):
        Tokenizer.from_file(tmp_path / "missing.txt")
    (tmp_path / "junk.txt").write_text("hello\n")
    with pytest.raises(UserError, match="not an mpitrain vocab.txt"):
        Tokenizer.from_file(tmp_path / "junk.txt")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(UserError, match="no 'vocab' group"):
        Tokenizer.from_file(tmp_path / "foreign.h5")
    tok = _tricky_tokenizer()
    tok.save_txt(tmp_path / "cut.txt")
    text = (tmp_path / "cut.txt").read_text(encoding="utf-8").split("\n")
    (tmp_path / "cut.txt").write_text("\n".join(text[:100]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="header says"):
        Tokenizer.from_file(tmp_path / "cut.txt")
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        tok.to_hdf5(f.create_group("vocab"))
        data = f["vocab/token_bytes"]
        data[1 + 65] = ord("B")  # byte id 'A' no longer holds b"A"
    with pytest.raises(UserError, match="not the 256 bytes"):
        Tokenizer.from_file(tmp_path / "bad.h5")


def test_decode_rejects_out_of_range(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
