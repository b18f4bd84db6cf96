"""Batched decoding (kernels/decode.c, mpitrain/generate.py Decoder) and the one sampler
(mpitrain/sampler.py).

Proofs held here:
- batch invariance: a sequence decoded alone and in steps shared with 1, 4 and 15 other
  sequences of other lengths (new prompts prefilled, running ones one id each, slots reset and
  refilled, contexts sliding) gets bitwise the same logits at every step -- also with the work
  split into 1 or 3 parts, and a prompt fed at once or id by id;
- every sequence's logits equal the full-context forward (mt_forward_logits, OpenBLAS) to
  REL of their spread, and a float64 NumPy reference (tests/reference_gpt.py) to REL_REF;
- the sampler over a batch draws for each row what that row's Sampler draws alone, and
  generate_batch gives each sequence the ids it gets decoded alone;
- bad steps are refused with nothing changed.
Sizes are odd on purpose (d_model 36, head size 9, d_ff 70, vocabulary 277), so the
fixed-order products' partial chunks of 8 and odd column counts are exercised.
"""
import numpy as np
import pytest

import reference_gpt
from mpitrain import ModelConfig
from mpitrain.generate import Decoder
from mpitrain.sampler import Sampler, sample
from test_generate_support import scaled_model

pytestmark = pytest.mark.numerics

ODD = ModelConfig(vocab_size=277, max_seq_len=24, d_model=36, n_layers=2, n_heads=4, d_ff=70)
T = ODD.max_seq_len
# Cached (fixed-order 8-lane FMA sums) against uncached (OpenBLAS) logits: both are float32
# sums of the same terms in different orders. Measured worst case over these tests 6.3e-7 of
# the logits' spread (a few float32 ulps of the largest terms); 2e-5 (30x) is the bound the
# one-sequence tests (tests/test_generate.py) use.
REL = 2e-5
# Against float64: float32 rounding through 2 layers; measured worst 5.0e-7 of the spread (the
# OpenBLAS forward: 7.0e-7), bound 1e-5 (20x).
REL_REF = 1e-5


def _model(threads=1, parts=None):
    model = scaled_model(ODD, seed=3, threads=threads)
    if parts:
        model.work_parts = parts
    return model


def _target_run(dec, slot, ids, prompt_len, others):
    """Decode `ids` in `slot` (a prompt, then one id a step) while `others` (a callable giving
    the other slots' feeds for step i) share every step; returns the target's logits."""
    out = []
    feeds = [(slot, ids[:prompt_len])] + others(0)
    out.append(dec.step(feeds)[0].copy())
    for i, t in enumerate(ids[prompt_len:], start=1):
        out.append(dec.step([(slot, [t])] + others(i))[0].copy())
    return out


def _others_feeder(dec, slot, rng):
    """Feeds for every slot but `slot`: new prompts of random lengths (some slots reset and
    refilled mid-way), otherwise 1-3 ids."""
    others = [s for s in range(dec.slots) if s != slot]

    def feeds(i):
        out = []
        for s in others:
            if i == 0 or rng.random() < 0.1:
                dec.reset(s)
                out.append((s, rng.integers(0, ODD.vocab_size, rng.integers(1, T + 1))))
            else:
                out.append((s, rng.integers(0, ODD.vocab_size, rng.integers(1, 4))))
        return out
    return feeds


def test_batch_invariance_and_thread_independence():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, ODD.vocab_size, 5 + 2 * T)
    alone_dec = Decoder(_model(), slots=1)
    alone = _target_run(alone_dec, 0, ids, 5, lambda i: [])
    assert alone_dec.slides() >= 2
    for slots, threads in ((2, 1), (5, 3), (16, 1), (16, 3)):
        dec = Decoder(_model(threads, parts=threads), slots=slots)
        slot = slots // 2
        got = _target_run(dec, slot, ids, 5, _others_feeder(dec, slot, rng))
        for step, (a, g) in enumerate(zip(alone, got)):
            assert np.array_equal(a, g), (slots, threads, step, float(np.abs(a - g).max()))
        assert dec.slides(slot) == alone_dec.slides()


def test_prompt_at_once_equals_id_by_id():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, ODD.vocab_size, T)
    dec = Decoder(_model(), slots=2)
    whole = dec.feed(ids, slot=0)
    for t in ids:
        last = dec.feed([t], slot=1)
    assert np.array_equal(whole, last)
    assert dec.context(0).tolist() == dec.context(1).tolist() == ids.tolist()


@pytest.mark.parametrize("threads", [1, 2])
def test_cached_matches_uncached_and_reference(threads):
    model = _model(threads, parts=threads)
    dec = Decoder(model, slots=6)
    rng = np.random.default_rng(2)
    worst = worst_ref = 0.0
    for k in range(6):
        dec.step([(k, rng.integers(0, ODD.vocab_size, 1 + 4 * k))])
    for _ in range(3 * T // 2):   # every slot slides at least once
        feeds = [(k, rng.integers(0, ODD.vocab_size, rng.integers(1, 3))) for k in range(6)]
        logits = dec.step(feeds)
        for k in range(6):
            ctx = dec.context(k)
            full = model.forward(ctx[None], last_only=True)[0]
            spread = float(np.ptp(full))
            assert spread > 1.0
            worst = max(worst, float(np.abs(logits[k] - full).max()) / spread)
        ctx = dec.context(5)
        ref = reference_gpt.forward(model.params, ctx[None], ODD)[0][0, -1]
        worst_ref = max(worst_ref, float(np.abs(logits[5] - ref).max()) / float(np.ptp(ref)))
    assert all(dec.slides(k) >= 1 for k in range(6))
    assert worst <= REL, worst
    assert worst_ref <= REL_REF, worst_ref


def test_step_refuses_bad_feeds_and_changes_nothing():
    dec = Decoder(_model(), slots=3, context=10)
    assert dec.max_context == 10
    dec.step([(0, [1, 2, 3]), (1, [4])])
    before = [dec.context(k).tolist() for k in range(3)]
    rows = dec.rows_computed
    for feeds in ([], [(3, [1])], [(-1, [1])], [(0, [1]), (0, [2])], [(1, [])],
                  [(1, list(range(11)))], [(1, [ODD.vocab_size])], [(1, [-1])],
                  [(1, [1.5])]):
        with pytest.raises(ValueError):
            dec.step(feeds)
    assert [dec.context(k).tolist() for k in range(3)] == before
    assert dec.rows_computed == rows
    with pytest.raises(ValueError):
        Decoder(_model(), slots=0)
    with pytest.raises(ValueError):
        Decoder(_model(), context=T + 1)


def test_context_limit_slides_per_slot():
    dec = Decoder(_model(), slots=2, context=8)
    dec.step([(0, np.arange(8)), (1, [5])])
    assert dec.rows_computed == 9
    dec.step([(0, [8]), (1, [6])])      # slot 0 is full: newest half + the new id, recomputed
    assert dec.context(0).tolist() == [4, 5, 6, 7, 8] and dec.slides(0) == 1
    assert dec.context(1).tolist() == [5, 6] and dec.slides(1) == 0
    assert dec.rows_computed == 9 + 5 + 1


def test_sampler_batch_equals_each_row_alone():
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (6, 50)).astype(np.float32)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8),
                (2.0, 1, 1.0)]
    batch = [Sampler(t, k, p, seed=10 + i) for i, (t, k, p) in enumerate(settings)]
    alone = [Sampler(t, k, p, seed=10 + i) for i, (t, k, p) in enumerate(settings)]
    for _ in range(30):
        got = sample(logits, batch)
        assert got.tolist() == [s(logits[i]) for i, s in enumerate(alone)]
    # a row's draws do not depend on the other rows of the batch
    one = Sampler(1.0, seed=3)
    mixed = [Sampler(1.0, seed=3), Sampler(0.5, seed=9)]
    for _ in range(30):
        assert sample(logits[:2], mixed)[0] == one(logits[0])
    with pytest.raises(ValueError):
        sample(logits[:2], [one])
    with pytest.raises(ValueError):
        sample(np.full((1, 3), np.nan), [one])


def test_sampler_threads_do_not_change_the_draws():
    # rows of 40,000 ids: one row per chunk, so 2 and 3 threads split the batch differently
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 3, (7, 40000)).astype(np.float32)
    settings = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.9), (0.9, 8, 0.5),
                (2.0, 0, 1.0), (0.5, 0, 0.95)]
    runs = {t: [Sampler(*s, seed=20 + i) for i, s in enumerate(settings)] for t in (1, 2, 3, 9)}
    for _ in range(5):
        got = {t: sample(logits, ss, threads=t).tolist() for t, ss in runs.items()}
        assert got[2] == got[1] and got[3] == got[1] and got[9] == got[1]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_batch_equals_each_sequence_alone(temperature):
    model = _model()
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, ODD.vocab_size, n) for n in (3, 1, 9, 30)]
    stop = 7
    together = [[] for _ in prompts]
    dec = Decoder(model, slots=4)
    samplers = [Sampler(temperature, seed=k) for k in range(4)]
    for made in dec.generate_batch(prompts, 2 * T, samplers, stop_ids={stop}):
        for k, t in made:
            together[k].append(t)
    for k, p in enumerate(prompts):
        alone = Decoder(model, slots=1)
        ids = [t for made in alone.generate_batch([p], 2 * T, [Sampler(temperature, seed=k)],
                                                  stop_ids={stop}) for _, t in made]
        assert ids == together[k]
        assert len(ids) == 2 * T or ids[-1] == stop
        # the one-sequence path (infer's) agrees as well
        single = Decoder(model, slots=1)
        assert list(single.generate(p, len(ids), Sampler(temperature, seed=k))) == ids


def test_bench_decode_smoke():
    """scripts/bench_decode.py runs (tiny preset, two batch sizes, few steps) and prints its
    table against the measured peak."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_decode.py"),
                           "--preset", "tiny", "--batches", "1", "3", "--steps", "3",
                           "--repeat", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "SGEMM peak" in lines[0] and "decode tok/s" in lines[2]
    assert [line.split()[0] for line in lines[3:]] == ["1", "3"]
