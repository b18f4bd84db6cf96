"""prepare's vectorised counting and encoding against the definition, on random corpora."""
import collections
import os
import re
import tempfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_corpus
from mpitrain.prepare import Options, prepare
from mpitrain.pretoken_counts import Counts
from mpitrain.tokenizer import PATTERN, Tokenizer

pytestmark = pytest.mark.slow  # property-based sweeps over many corpora

# Text from a small alphabet (so pre-tokens repeat and the vocabulary fills), plus any
# character now and then (emoji, CJK, controls, combining marks, CR/LF).
ALPHABET = st.sampled_from(list("ab c_1.\n\r\t\x07") + ["é", "日", "😀"])
TEXT = st.text(alphabet=st.one_of(ALPHABET, st.characters(blacklist_categories=("Cs",),
                                                          blacklist_characters="\x00")),
               min_size=0, max_size=200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(TEXT, min_size=2, max_size=6), vocab_extra=st.integers(1, 40))
def test_prepare_equals_definition(docs, vocab_extra):
    vocab_size = 257 + vocab_extra
    with tempfile.TemporaryDirectory() as tmp:
        files = {f"d{i}.txt": t for i, t in enumerate(docs)}
        data = write_corpus(os.path.join(tmp, "c"), files)
        out = os.path.join(tmp, "ds.h5")
        s = prepare(Options(data=data, out=out, vocab_size=vocab_size, quiet=True))
        counts = collections.Counter(t for d in docs for t in re.findall(PATTERN, d))
        multi = sorted((t for t in counts if len(t.encode()) > 1),
                       key=lambda t: (-counts[t], t.encode()))[:vocab_extra]
        tok = Tokenizer.from_file(out)
        assert tok.pretokens == multi
        with h5py.File(out, "r") as f:
            tokens = f["tokens"][()]
            offsets = f["documents/offsets"][()]
        expected = [np.append(tok.encode(d), 0) for d in docs]
        np.testing.assert_array_equal(tokens, np.concatenate(expected))
        for k, d in enumerate(docs):
            assert tok.decode(tokens[offsets[k]:offsets[k + 1] - 1]) == d
        fallback = sum(c for t, c in counts.items() if len(t.encode()) > 1 and t not in tok.ids)
        assert s["pretokens"] == sum(counts.values())
        assert s["pretokens_byte_fallback"] == fallback


@given(parts=st.lists(st.lists(st.sampled_from(["a", "bb", " c", "日", "😀😀"]), max_size=20),
                      min_size=1, max_size=4))
def test_merging_count_tables_is_a_sum(parts, tmp_path_factory):
    """Rank 0 merges the other ranks' tables into its own: the totals are the sums, and the
    ids its own table had given stay what they were."""
    own = Counts(1 << 20, str(tmp_path_factory.mktemp("runs")))
    before = {t: int(i) for t, i in zip(parts[0], own.add(list(parts[0])))}
    for p in parts[1:]:
        c = collections.Counter(p)
        own.merge(list(c), np.array(list(c.values()), dtype=np.int64))
    want = sum((collections.Counter(p) for p in parts), collections.Counter())
    assert {k.decode(): n for k, n in own.items()} == dict(want)
    assert all(own.index[t] == i for t, i in before.items())
    assert own.total == sum(len(p) for p in parts)
