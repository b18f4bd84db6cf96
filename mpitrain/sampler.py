"""Choosing next ids from logits: the one sampler of every decoding path (`infer`, the training
samples, a batch of sequences decoded together).

A Sampler holds one sequence's settings and its own random generator:

    samplers = [Sampler(temperature=0.8, top_k=40, top_p=0.95, seed=s) for s in (1, 2, 3)]
    ids = sample(logits, samplers)          # logits (3, V): one id per row

temperature 0 is greedy (argmax, deterministic); otherwise the draw is from
softmax(logits / temperature) restricted to the top-k ids (all ids tied with the k-th are kept)
and then to the smallest set, most likely first, whose probability reaches top-p. `sample`
works on the batch a few rows at a time (softmax vectorised over the rows of a chunk small
enough to stay in cache; top-p sorts only the likeliest ids, as many as the set needs) and
takes one uniform number per sampled row from that row's own generator, so a
sequence's draws depend only on its logits, its settings and its seed -- never on the other
sequences of the batch, nor on how many threads share the rows (`threads`: the batch's chunks
are split among that many threads; NumPy releases the GIL inside its loops). A draw is the
inverse of the cumulative distribution at the row's uniform number u (side "right", as numpy's
Generator.choice(V, p=probabilities)), its cumulative sums taken in blocks of ids (`_draw`):
the id choice would give, except where u lies within rounding (about V 2^-52) of a boundary.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Sampler:
    """One sequence's sampling settings and random stream. temperature 0: greedy; top_k 0 and
    top_p 1: no restriction; seed: anything numpy.random.default_rng takes."""

    def __init__(self, temperature=1.0, top_k=0, top_p=1.0, seed=0):
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0, got {temperature!r}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits):
        """The distribution drawn from (float64 (V,), zeros outside top-k / top-p)."""
        return probabilities(np.asarray(logits)[None], [self])[0]

    def __call__(self, logits) -> int:
        return int(sample(np.asarray(logits)[None], [self])[0])


# Rows are worked on a few at a time, so that each row's float64 temporaries stay in the L2
# cache (a 30,000-id row is 240 KB): at B x V = 64 x 30,000 one pass over the whole batch would
# go through memory about ten times.
_CHUNK_FLOATS = 32768


def _row_chunks(B, V):
    step = max(1, _CHUNK_FLOATS // max(V, 1))
    return [(i, min(B, i + step)) for i in range(0, B, step)]


def probabilities(logits, samplers):
    """float64 (B,V): row b's distribution under samplers[b] (temperature > 0 each)."""
    logits = np.asarray(logits)
    B, V = logits.shape
    out = np.empty((B, V))
    for r0, r1 in _row_chunks(B, V):
        out[r0:r1] = _probabilities(logits[r0:r1], samplers[r0:r1])
    return out


def _probabilities(logits, samplers):
    z = np.array(logits, np.float64)          # a copy: worked on in place
    B, V = z.shape
    z /= np.array([s.temperature for s in samplers])[:, None]
    k = np.array([s.top_k for s in samplers])
    cut_k = (k > 0) & (k < V)
    for kk in np.unique(k[cut_k]):          # rows sharing a k: one partition for all of them
        rows = np.flatnonzero(cut_k & (k == kk))
        kth = np.partition(z[rows], -kk, axis=1)[:, -kk]
        z[rows] = np.where(z[rows] >= kth[:, None], z[rows], -np.inf)
    z -= z.max(axis=1, keepdims=True)
    # exp in float32 (NumPy's vectorised loop, ~4x float64's here): the arguments are float32
    # logits' differences, so float64 would only carry their rounding further; the relative
    # error of a probability is a few float32 ulps of its argument (the distribution test
    # states the bound).
    p = np.exp(z.astype(np.float32)).astype(np.float64)
    p /= p.sum(axis=1, keepdims=True)
    for b, s in enumerate(samplers):
        if s.top_p < 1.0:
            q = p[b]
            keep = _nucleus(q, s.top_p)
            q[~keep] = 0.0
            q /= q.sum()
    return p


def _nucleus(q, top_p):
    """bool (V,): the smallest set of ids, most likely first (ties: lower id first), whose
    probabilities q (one row) add up to top_p -- the prefix of the stable descending sort whose
    sequential cumulative sum first reaches top_p, always at least one id. Only the ids at or
    above a threshold are sorted: the m most likely (all ids tied with the m-th included, so
    the sorted prefix is the full sort's); m grows until their sum reaches top_p."""
    V = q.size
    m = 64
    while m < V // 4:
        kth = np.partition(q, V - m)[V - m]
        top = np.flatnonzero(q >= kth)                 # in id order
        order = top[np.argsort(-q[top], kind="stable")]
        cum = np.cumsum(q[order])
        if cum[-1] >= top_p:                           # the cut lies inside this prefix
            cut = int(np.searchsorted(cum, top_p, side="left")) + 1
            keep = np.zeros(V, bool)
            keep[order[:cut]] = True
            return keep
        m *= 8
    order = np.argsort(-q, kind="stable")
    cum = np.cumsum(q[order])
    cut = int((cum < top_p).sum()) + 1
    keep = np.zeros(V, bool)
    keep[order[:cut]] = True
    return keep


def sample(logits, samplers, threads=1):
    """Next ids, int64 (B,), for logits (B,V) with samplers[b] (settings and generator) for
    row b, the rows' chunks shared among `threads` threads (the same ids for any number).
    ValueError for logits with NaN or Inf."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits {logits.shape} do not match {len(samplers)} samplers")
    if not np.isfinite(logits).all():
        raise ValueError("the logits contain NaN or Inf")
    out = np.argmax(logits, axis=1)
    drawn = [b for b, s in enumerate(samplers) if s.temperature != 0.0]
    if not drawn:
        return out
    u = np.array([samplers[b].rng.random() for b in drawn])
    sub = logits[drawn]
    subs = [samplers[b] for b in drawn]

    def work(chunks):
        for r0, r1 in chunks:
            p = _probabilities(sub[r0:r1], subs[r0:r1])
            for i in range(r1 - r0):
                out[drawn[r0 + i]] = _draw(p[i], u[r0 + i])

    chunks = _row_chunks(len(drawn), logits.shape[1])
    n = max(1, min(int(threads), len(chunks)))
    parts = [chunks[len(chunks) * t // n:len(chunks) * (t + 1) // n] for t in range(n)]
    pool = _pool(n - 1) if n > 1 else None
    others = [pool.submit(work, p) for p in parts[1:]]
    work(parts[0])
    for f in others:
        f.result()
    return out


_pools = {}
_pools_lock = threading.Lock()


def _pool(n):
    """A process-wide pool of n helper threads (made once per n)."""
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="mpitrain-sample")
        return _pools[n]


_DRAW_BLOCK = 256   # ids per block of the draw's cumulative sums


def _draw(p, u):
    """The id drawn at uniform u in [0, 1) from one row of probabilities p (float64, >= 0,
    positive sum; normalised or not): the first id whose cumulative probability exceeds
    u x the total. The cumulative sums are taken in blocks: the blocks' sums, their sequential
    cumulative sum (whose last value is the total), then the sequential sum inside the one
    block the target u x total falls in -- a full sequential cumulative sum of a 30,000-id row
    cost as much as the rest of the sampler. Only an id with p > 0 is ever drawn (where
    rounding leaves the target past a block's or the row's last sum, the last such id)."""
    B = _DRAW_BLOCK
    n = p.size // B * B
    sums = p[:n].reshape(-1, B).sum(axis=1)
    if n < p.size:
        sums = np.append(sums, p[n:].sum())
    cum = np.cumsum(sums)
    target = u * cum[-1]
    b = int(np.searchsorted(cum, target, side="right"))   # first block whose sum passes it
    if b == cum.size:
        b = int(np.flatnonzero(sums > 0)[-1])
    block = p[b * B:(b + 1) * B]
    j = int(np.searchsorted((cum[b - 1] if b else 0.0) + np.cumsum(block), target,
                            side="right"))
    if j == block.size:
        j = int(np.flatnonzero(block > 0)[-1])
    return b * B + j


def sample_seed(seed, i):
    """The seed of sample i when one prompt is continued several times (the server's `n`):
    seed + i, so sample 0 is exactly the one-sample run with that seed. None (a random seed)
    stays None."""
    return None if seed is None else int(seed) + int(i)
