"""Generation with the key/value cache (kernels/decode.c, mpitrain/generate.py), one sequence;
batches of sequences are tested in tests/test_decode_batch.py.

Proofs held here:
- every step's logits equal the full-context forward (Model.forward over the ids the cache
  holds) to 2e-5 relative to the logits' spread, for work split into 1, 2 and 3 parts, prompts
  of 1..max_seq_len ids, and across several slides (context cut to its newest half, cache
  rebuilt);
- greedy decoding's first 20 tokens equal a float64 NumPy reference decode of the same weights;
- a step computes one new position only (the kernel's row counter), a slide max_seq_len/2 + 1;
- sampling: temperature 0 is argmax, the top-k / top-p distribution equals a plain definition,
  seeded draws repeat, and their frequencies follow the distribution.
"""
import numpy as np
import pytest

from mpitrain.generate import Decoder
from mpitrain.sampler import Sampler
from tolerances import assert_within
from test_generate_support import CONFIG, TOKENIZER, reference_greedy, save_model, scaled_model

pytestmark = pytest.mark.numerics

T = CONFIG.max_seq_len
REL = 2e-5


def _check_close(got, ref):
    spread = float(np.ptp(ref))
    assert spread > 1.0, spread          # the scaled model has O(1) logits
    assert_within(got, ref, REL * spread, "logits")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("prompt_len", [1, 5, T])
def test_cache_matches_full_context_forward_across_slides(threads, prompt_len):
    model = scaled_model(threads=threads)
    model.work_parts = threads      # really split the work (the default caps it at the CPUs)
    gen = Decoder(model)
    rng = np.random.default_rng(prompt_len)
    ids = rng.integers(0, CONFIG.vocab_size, prompt_len + 3 * T)
    logits = gen.feed(ids[:prompt_len]).copy()
    _check_close(logits, model.forward(ids[None, :prompt_len].astype(np.int32), True)[0])
    for t in range(prompt_len, ids.size):
        logits = gen.feed(ids[t:t + 1]).copy()
        ctx = gen.context()
        assert ctx[-1] == ids[t] and 1 <= ctx.size <= T
        _check_close(logits, model.forward(ctx[None], last_only=True)[0])
    assert gen.slides() >= 5


def test_thread_count_changed_between_feeds():
    model = scaled_model(threads=1)
    gen = Decoder(model)
    ids = np.arange(2 * T) * 7 % CONFIG.vocab_size
    gen.feed(ids[:3])
    for t in range(3, 2 * T):
        if t == 8:
            model.threads, model.work_parts = 4, 4     # the kernel's pool is replaced
        if t == 20:
            model.threads = 2
        logits = gen.feed(ids[t:t + 1]).copy()
        _check_close(logits, model.forward(gen.context()[None], last_only=True)[0])


def test_slide_keeps_newest_half_and_recomputes_only_then():
    model = scaled_model()
    gen = Decoder(model)
    ids = np.arange(3 * T) % CONFIG.vocab_size
    gen.feed(ids[:5])
    assert gen.rows_computed == 5
    for t in range(5, T):
        gen.feed(ids[t:t + 1])
    assert gen.rows_computed == T and gen.slides() == 0      # one new position per step
    gen.feed(ids[T:T + 1])                                 # the context is full: slide
    assert gen.slides() == 1
    assert gen.context().tolist() == ids[T - T // 2:T + 1].tolist()   # newest half + new id
    assert gen.rows_computed == T + T // 2 + 1
    gen.feed(ids[T + 1:T + 2])
    assert gen.rows_computed == T + T // 2 + 2
    # a feed of several ids that does not fit keeps fewer old ids so that all new ones fit
    gen.feed(ids[:T - 2])
    assert gen.length() == T and gen.context().tolist()[-(T - 2):] == ids[:T - 2].tolist()


def test_against_numpy_reference_first_20_greedy_tokens():
    model = scaled_model(seed=6)
    gen = Decoder(model)
    prompt = TOKENIZER.encode(" the quick brown fox")
    got = list(gen.generate(prompt, 20, Sampler(temperature=0)))
    ref = reference_greedy(model.params, CONFIG, prompt, 20)
    assert got == ref
    assert len(set(got)) > 3          # not a degenerate repetition of one id
    assert gen.slides() >= 1            # 4 + 20 ids pass max_seq_len 16: the slide is covered


def test_greedy_is_deterministic_and_thread_independent(tmp_path):
    path = save_model(tmp_path / "m.h5", scaled_model(seed=5))
    runs = []
    for threads in (1, 2, 1):
        gen = Decoder.from_file(path, threads=threads)
        runs.append(list(gen.generate(TOKENIZER.encode("the fox"), 30, Sampler(0))))
    assert runs[0] == runs[1] == runs[2]


def test_from_file_loads_the_weights(tmp_path):
    model = scaled_model(seed=6)
    path = save_model(tmp_path / "m.h5", model)
    gen = Decoder.from_file(path)
    assert gen.tokenizer.vocab_size == CONFIG.vocab_size and gen.checkpoint.step == 3
    for name in model.param_names:
        np.testing.assert_array_equal(gen.model.params[name], model.params[name])
    ids = TOKENIZER.encode(" lazy dog")
    _check_close(gen.feed(ids), model.forward(ids[None], True)[0])


def test_generate_continues_context_and_stops_at_stop_id():
    model = scaled_model(seed=7)
    gen = Decoder(model)
    first = list(gen.generate([3, 4, 5], 4, Sampler(0)))
    assert gen.context().tolist() == [3, 4, 5] + first
    more = list(gen.generate([], 3, Sampler(0)))
    ref = reference_greedy(model.params, CONFIG, [3, 4, 5] + first, 3)
    assert more == ref
    stop = more[0]
    gen.reset()
    assert gen.length() == 0
    assert list(gen.generate([3, 4, 5] + first, 10, Sampler(0), stop_ids={stop})) == [stop]
    with pytest.raises(ValueError):
        Decoder(model).generate([], 2, Sampler(0)).__next__()


@pytest.mark.parametrize("ids", [[], list(range(T + 1)), [-1], [CONFIG.vocab_size]])
def test_feed_refuses_bad_ids(ids):
    with pytest.raises(ValueError):
        Decoder(scaled_model()).feed(np.array(ids, np.int64))


def _plain_distribution(logits, temperature, top_k, top_p):
    """top-k then top-p over softmax(logits / T), written as plainly as possible."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: (-z[i], i))
    allowed = order[:top_k] if top_k else order
    m = max(z)
    w = {i: np.exp(z[i] - m) for i in allowed}
    s = sum(w.values())
    p = {i: w[i] / s for i in allowed}
    kept, mass = [], 0.0
    for i in order:
        if i not in p:
            continue
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    s = sum(p[i] for i in kept)
    out = np.zeros(len(z))
    for i in kept:
        out[i] = p[i] / s
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (0.9, 8, 0.8), (2.0, 1, 1.0), (1.0, 0, 1e-9)])
def test_sampler_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(0, 2, 40).astype(np.float32)
    got = Sampler(temperature, top_k, top_p).probabilities(logits)
    ref = _plain_distribution(logits.astype(np.float64), temperature, top_k, top_p)
    # The sampler takes exp in float32: its argument d = (x - max) / T is rounded to float32
    # (relative 2^-24, so an error of |d| 2^-24 in the exponent) and exp adds a few ulps
    # (< 4 x 2^-24): each exp is within (max |d| + 4) 2^-24 relatively, and dividing by their
    # float64 sum (a weighted mean of such errors) at most doubles it.
    d = (logits.astype(np.float64) - logits.max()) / temperature
    rtol = 2 * (np.abs(d).max() + 4) * 2.0 ** -24
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-300)


def test_sampler_draws():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert Sampler(0)(logits) == 0
    a = [Sampler(1.0, seed=3)(logits) for _ in range(3)]
    s1, s2 = Sampler(1.0, seed=3), Sampler(1.0, seed=3)
    d1 = [s1(logits) for _ in range(50)]
    assert d1 == [s2(logits) for _ in range(50)]
    assert a == [d1[0]] * 3
    s = Sampler(1.0, seed=11)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    # a frequency over n = 4000 draws has sigma <= sqrt(0.25 / n) = 0.008: atol 0.03 ~ 4 sigma
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sampler_fast_paths_equal_the_full_sort():
    """The nucleus from a partial sort of the likeliest ids gives bitwise what the plain
    definition gives: the full stable descending sort and its cumulative sum. The blocked draw
    gives the plain inverse of the sequential cumulative distribution, up to rounding, and never
    an id of probability 0. Large vocabularies (the partial path), peaked and flat rows, ties
    (rounded logits, top-k zeros)."""
    from mpitrain.sampler import _draw, _nucleus, probabilities

    rng = np.random.default_rng(5)
    for trial in range(40):
        V = int(rng.choice([300, 5000, 30000]))
        logits = rng.normal(0, float(rng.choice([0.3, 3, 8])), V).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)
        top_k = int(rng.choice([0, 50, 2000]))
        p = probabilities(logits[None], [Sampler(0.8, top_k=top_k)])[0]
        for top_p in (0.3, 0.9, 0.99, 1 - 1e-12):
            order = np.argsort(-p, kind="stable")
            cut = int((np.cumsum(p[order]) < top_p).sum()) + 1
            want = np.zeros(V, bool)
            want[order[:cut]] = True
            assert (_nucleus(p, top_p) == want).all(), (trial, top_p)
        cdf = np.cumsum(p)
        tot = cdf[-1]
        # blocked and sequential sums of V non-negative terms differ by at most ~V 2^-53 tot
        # each; 2 V 2^-52 tot is a safe margin for "the same point of the distribution"
        eps = 2 * V * 2.0 ** -52 * tot
        for u in list(rng.random(20)) + list(cdf[rng.integers(0, V, 20)] / tot) + [0.0,
                                                                                   1 - 2 ** -53]:
            j = _draw(p, u)
            assert p[j] > 0, (trial, u)
            below = cdf[j - 1] if j else 0.0
            assert below - eps <= u * tot <= cdf[j] + eps, (trial, u, j)
            if not (np.abs(cdf - u * tot) <= eps).any():   # no boundary within rounding
                assert j == int((cdf / tot <= u).sum()), (trial, u)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=float("nan")),
                                dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampler_refuses_bad_settings(kw):
    with pytest.raises(ValueError):
        Sampler(**kw)


def test_bench_infer_smoke():
    """scripts/bench_infer.py runs (tiny preset, small array) and prints its figures; its
    bytes-per-token count is asserted inside against the kernel's parameter table."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_infer.py"),
                           "--preset", "tiny", "--tokens", "8", "--repeat", "1",
                           "--big-mb", "16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "kernel feed, 1 token:" in out and "bandwidth limit:" in out
    assert "greedy generation (total):" in out
