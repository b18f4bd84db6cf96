"""Choosing next ids from logits: the one sampler of every decoding path (`infer`, the training
samples, a batch of sequences decoded together).

A Sampler holds one sequence's settings and its own random generator:

    samplers = [Sampler(temperature=0.8, top_k=40, top_p=0.95, seed=s) for s in (1, 2, 3)]
    ids = sample(logits, samplers)          # logits (3, V): one id per row

temperature 0 is greedy (argmax, deterministic); otherwise the draw is from
softmax(logits / temperature) restricted to the top-k ids (all ids tied with the k-th are kept)
and then to the smallest set, most likely first, whose probability reaches top-p. `sample`
works on the whole batch at once (sorting, softmax and cumulative sums are vectorised over the
rows) and takes one uniform number per sampled row from that row's own generator, so a
sequence's draws depend only on its logits, its settings and its seed -- never on the other
sequences of the batch. A draw equals numpy's Generator.choice(V, p=probabilities) from the same
generator state (inverse of the cumulative distribution, side "right").
"""
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


def probabilities(logits, samplers):
    """float64 (B,V): row b's distribution under samplers[b] (temperature > 0 each)."""
    z = np.asarray(logits, np.float64)
    B, V = z.shape
    z = z / np.array([s.temperature for s in samplers])[:, None]
    k = np.array([s.top_k for s in samplers])
    cut_k = (k > 0) & (k < V)
    for kk in np.unique(k[cut_k]):          # rows sharing a k: one partition for all of them
        rows = np.flatnonzero(cut_k & (k == kk))
        kth = np.partition(z[rows], -kk, axis=1)[:, -kk]
        z[rows] = np.where(z[rows] >= kth[:, None], z[rows], -np.inf)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top_p = np.array([s.top_p for s in samplers])
    cut_p = top_p < 1.0
    if cut_p.any():
        q = p[cut_p]
        order = np.argsort(-q, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(q, order, axis=1), axis=1)
        # the smallest prefix whose mass reaches top_p (always at least one id)
        cut = (cum < top_p[cut_p][:, None]).sum(axis=1) + 1
        keep = np.zeros(q.shape, bool)
        np.put_along_axis(keep, order, np.arange(V)[None, :] < cut[:, None], axis=1)
        q = np.where(keep, q, 0.0)
        p[cut_p] = q / q.sum(axis=1, keepdims=True)
    return p


def sample(logits, samplers):
    """Next ids, int64 (B,), for logits (B,V) with samplers[b] (settings and generator) for
    row b. ValueError for logits with NaN or Inf."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits {logits.shape} do not match {len(samplers)} samplers")
    if not np.isfinite(logits).all():
        raise ValueError("the logits contain NaN or Inf")
    out = np.argmax(logits, axis=1)
    drawn = [b for b, s in enumerate(samplers) if s.temperature != 0.0]
    if drawn:
        p = probabilities(logits[drawn], [samplers[b] for b in drawn])
        cdf = np.cumsum(p, axis=1)
        cdf /= cdf[:, -1:]
        u = np.array([samplers[b].rng.random() for b in drawn])
        out[drawn] = (cdf <= u[:, None]).sum(axis=1)
    return out


def sample_seed(seed, i):
    """The seed of sample i when one prompt is continued several times (the server's `n`):
    seed + i, so sample 0 is exactly the one-sample run with that seed. None (a random seed)
    stays None."""
    return None if seed is None else int(seed) + int(i)
