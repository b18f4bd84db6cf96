"""Learning-rate schedule, data order and window cutting, against direct restatements."""
import math

import numpy as np
import pytest

from mpitrain import schedule as s


def test_lr_warmup_then_cosine():
    peak, warmup, total = 1e-3, 10, 110
    lrs = [s.lr_at(k, peak, warmup, total) for k in range(1, total + 1)]
    # Linear from 0: step k of warmup is k/warmup of the peak; the peak at step `warmup`.
    # (Float64 formulas of a few operations each: rel 1e-12 is thousands of ulps of slack.)
    for k in range(1, warmup + 1):
        assert lrs[k - 1] == pytest.approx(peak * k / warmup, rel=1e-12)
    # Cosine to 10% at the planned last step, through the midpoint value 0.55 * peak.
    assert lrs[total - 1] == pytest.approx(0.1 * peak, rel=1e-12)
    assert s.lr_at(warmup + 50, peak, warmup, total) == pytest.approx(0.55 * peak, rel=1e-12)
    for k in range(warmup + 1, total + 1):
        ref = 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (total - warmup)))
        assert lrs[k - 1] == pytest.approx(ref, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[warmup - 1:], lrs[warmup:]))  # never rises after
    assert s.lr_at(total + 5, peak, warmup, total) == pytest.approx(0.1 * peak)


def test_lr_warmup_longer_than_run_and_no_warmup():
    # warmup >= total: the whole run is the linear rise, never above the peak.
    assert [s.lr_at(k, 1.0, 100, 20) for k in (1, 20)] == [0.01, 0.2]
    assert s.lr_at(5, 1.0, 5, 5) == 1.0
    # No warmup: step 1 is already on the cosine, just below the peak.
    assert 0.99 < s.lr_at(1, 1.0, 0, 1000) < 1.0
    with pytest.raises(ValueError):
        s.lr_at(0, 1.0, 10, 100)


def test_total_steps():
    assert s.total_steps(100, 10, 1) == 10
    assert s.total_steps(101, 10, 1) == 11          # the last step runs into the next epoch
    assert s.total_steps(100, 32, 3) == 10          # ceil(300 / 32)
    assert s.total_steps(100, 10, 5, max_steps=7) == 7
    assert s.total_steps(100, 10, 1, max_steps=70) == 10
    with pytest.raises(ValueError):
        s.total_steps(0, 10, 1)


def test_epoch_order_is_the_documented_generator():
    ref = np.random.default_rng((7, 3)).permutation(50)
    assert np.array_equal(s.epoch_order(50, 7, 3), ref)
    assert not np.array_equal(s.epoch_order(50, 7, 3), s.epoch_order(50, 7, 4))


@pytest.mark.parametrize("n,batch", [(50, 7), (48, 12), (10, 10), (5, 12), (1, 3)])
def test_every_window_once_per_epoch(n, batch):
    pos, taken = s.DataPosition(), []
    for _ in range(-(-4 * n // batch) + 2):
        ids, pos = s.next_batch(pos, batch, n, seed=11)
        assert ids.shape == (batch,) and ids.dtype == np.int64
        assert 0 <= pos.index < n
        taken.extend(ids.tolist())
    # The stream of ids is the concatenation of the epoch orders, so each epoch's slice is a
    # permutation: every training window seen exactly once per epoch.
    for epoch in range(4):
        chunk = taken[epoch * n:(epoch + 1) * n]
        assert chunk == s.epoch_order(n, 11, epoch).tolist()
        assert sorted(chunk) == list(range(n))


def test_batch_crossing_an_epoch_and_resuming_mid_epoch():
    ids, pos = s.next_batch(s.DataPosition(0, 8), 5, 10, seed=0)
    e0, e1 = s.epoch_order(10, 0, 0), s.epoch_order(10, 0, 1)
    assert ids.tolist() == e0[8:].tolist() + e1[:3].tolist()
    assert pos == s.DataPosition(1, 3)
    # Resuming from a saved position continues the same stream.
    straight = [s.next_batch(s.DataPosition(0, 0), 4, 10, 0)]
    p = straight[0][1]
    a, _ = s.next_batch(p, 4, 10, 0)
    b, _ = s.next_batch(s.DataPosition.from_dict(p.to_dict()), 4, 10, 0)
    assert np.array_equal(a, b)
    ids, pos = s.next_batch(s.DataPosition(0, 7), 3, 10, seed=0)
    assert pos == s.DataPosition(1, 0)
    with pytest.raises(ValueError):
        s.next_batch(s.DataPosition(0, 10), 3, 10, 0)


def test_eval_window_ids():
    ids = s.eval_window_ids(100, 8)
    assert ids.tolist() == [0, 12, 25, 37, 50, 62, 75, 87]
    assert s.eval_window_ids(5, 8).tolist() == [0, 1, 2, 3, 4]
    assert s.eval_window_ids(0, 8).tolist() == []
    for n in range(1, 60):
        for c in range(0, n + 3):
            ids = s.eval_window_ids(n, c)
            assert len(ids) == min(n, c) and len(set(ids.tolist())) == len(ids)
            assert ids.size == 0 or (ids[0] >= 0 and ids[-1] < n)


def test_window_count():
    assert s.window_count(0, 4) == 0
    assert s.window_count(4, 4) == 0     # a window needs 5 tokens
    assert s.window_count(5, 4) == 1
    assert s.window_count(8, 4) == 1
    assert s.window_count(9, 4) == 2     # windows share their boundary token
    for n in range(0, 40):
        for L in range(1, 6):
            ref = sum(1 for i in range(n) if i * L + L + 1 <= n)
            assert s.window_count(n, L) == ref


def test_gather_windows_by_loop():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60000, size=103).astype(np.uint16)
    L = 8
    ids = np.array([3, 0, 11, 3])
    x, y = s.gather_windows(tokens, ids, L)
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.shape == y.shape == (4, L)
    assert x.flags.c_contiguous and y.flags.c_contiguous
    for b, i in enumerate(ids):
        assert x[b].tolist() == tokens[i * L:i * L + L].tolist()
        assert y[b].tolist() == tokens[i * L + 1:i * L + L + 1].tolist()
    with pytest.raises(IndexError):
        s.gather_windows(tokens, [s.window_count(103, L)], L)
    x, y = s.gather_windows(tokens, [], L)
    assert x.shape == (0, L)
