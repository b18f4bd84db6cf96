"""The model options (docs/DESIGN.md, "The model"): rotary positions, lattice embeddings, the
Ulam attention pattern.

- each option (and all together) against the float64 NumPy reference, forward and backward,
  and the kernel's gradients against float32 finite differences;
- rotary positions against the rotary implementation of `transformers` (skipped without it);
- the cached decode (kernels/decode.c) against the full-context forward, contexts sliding;
- lattice embeddings: mean, standard deviation, independence of the seed, low discrepancy,
  every other tensor the normal initialisation's;
- the tensor table without transformer.wpe.weight under rotary positions; GPT-2 export refuses
  each option by name.
Tolerances are the ones tests/test_model.py and tests/test_decode_batch.py state and measure
for the plain model: the options add no new kind of rounding (the turn is one multiply-add per
element, the Ulam rows are rowdot.c's fixed-order sums).
"""
import math

import numpy as np
import pytest

import reference_gpt as ref
from mpitrain import Model, ModelConfig
from mpitrain.generate import Decoder
from test_generate_support import scaled_model
from test_model import assert_grads_close, batch, perturbed_model
from tolerances import assert_close, assert_scalar

pytestmark = pytest.mark.numerics

BASE = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
OPTIONS = {
    "rotary": dict(position="rotary"),
    "ulam": dict(attention_pattern="ulam", attention_window=2),
    "ulam0": dict(attention_pattern="ulam", attention_window=0),
    "all": dict(position="rotary", attention_pattern="ulam", attention_window=3, init="lattice"),
}


def config(name):
    return ModelConfig(**BASE, **OPTIONS[name])


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_forward_backward_match_reference(name):
    cfg = config(name)
    model = perturbed_model(cfg)
    for B, T in ((3, 8), (2, cfg.max_seq_len), (1, 1)):
        inputs, targets = batch(cfg, B=B, T=T, seed=T)
        loss = model.forward_backward(inputs, targets)
        r_loss, r_logits, r_grads = ref.loss_and_grads(model.params, inputs, targets, cfg)
        assert set(r_grads) == set(model.param_names)
        assert_scalar(loss, r_loss, rel=1e-6)
        assert_grads_close(model.grads, r_grads, model.param_names)
        assert_close(model.forward(inputs), r_logits, rtol=1e-5, atol=1e-5)
        assert_scalar(model.loss(inputs, targets), r_loss, rel=1e-6)


def test_reference_sees_the_pattern():
    """The options change the function (a test above passing for a no-op would be empty)."""
    model = perturbed_model(ModelConfig(**BASE))
    inputs, targets = batch(ModelConfig(**BASE), B=2, T=16)
    plain = ref.loss_and_grads(model.params, inputs, targets, ModelConfig(**BASE))[0]
    ulam = ref.loss_and_grads(model.params, inputs, targets, config("ulam"))[0]
    params = {k: v for k, v in model.params.items() if k != "transformer.wpe.weight"}
    rotary = ref.loss_and_grads(params, inputs, targets, config("rotary"))[0]
    assert abs(plain - ulam) > 1e-4 and abs(plain - rotary) > 1e-4
    mask = ref.attention_mask(16, config("ulam"))
    assert mask[15].nonzero()[0].tolist() == [2, 4, 8, 10, 12, 13, 14, 15]  # d 13,11,7,5,3,2,1,0


@pytest.mark.parametrize("name", ["rotary", "all"])
def test_kernel_gradients_match_finite_differences_float32(name):
    # The bound of tests/test_model.py's float32 check: |fd - g| <= 5e-5 + 2e-2 |g|, h = 1e-2.
    cfg = config(name)
    model = perturbed_model(cfg, noise=0.1)
    inputs, targets = batch(cfg, B=2, T=12, seed=9)
    model.forward_backward(inputs, targets)
    grads = {n: g.copy() for n, g in model.grads.items()}
    rng = np.random.default_rng(6)
    h = 1e-2
    for name_ in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                  "transformer.h.1.attn.c_attn.weight", "transformer.wte.weight"):
        p, g = model.params[name_], grads[name_]
        picks = [np.unravel_index(np.argmax(np.abs(g)), g.shape)]
        picks += [tuple(rng.integers(0, s) for s in g.shape) for _ in range(3)]
        for idx in picks:
            old = p[idx]
            p[idx] = old + h
            up = model.loss(inputs, targets)
            p[idx] = old - h
            down = model.loss(inputs, targets)
            p[idx] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g[idx]) <= 5e-5 + 2e-2 * abs(g[idx]), (name_, idx, fd, g[idx])


def test_rotary_matches_transformers():
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, hs, NH = 40, 16, 3
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, NH, T, hs))
    cos, sin = ref.rope_tables(T, hs)
    want_q, want_k = (t * cos + ref.rotate_half(t) * sin for t in (q, k))
    # transformers' own frequencies: inv_freq = 1 / base^(arange(0, dim, 2) / dim)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], -1)
    got_q, got_k = llama.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(k),
                                              emb.cos()[None], emb.sin()[None])
    assert np.allclose(got_q.numpy(), want_q, rtol=0, atol=1e-12)
    assert np.allclose(got_k.numpy(), want_k, rtol=0, atol=1e-12)
    # ... and the kernel's attention with rotary equals attention over transformers' turn
    cfg = config("rotary")
    model = perturbed_model(cfg)
    inputs, _ = batch(cfg, B=1, T=16, seed=3)
    r_logits = ref.forward(model.params, inputs, cfg)[0]
    assert_close(model.forward(inputs), r_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rotary", "ulam", "all"])
def test_cached_decode_matches_uncached_with_slides(name):
    # REL of tests/test_decode_batch.py: fixed-order sums against OpenBLAS, 2e-5 of the spread.
    cfg = config(name)
    model = scaled_model(cfg, seed=3, threads=2)
    dec = Decoder(model, slots=3)
    rng = np.random.default_rng(2)
    for k in range(3):
        dec.step([(k, rng.integers(0, cfg.vocab_size, 1 + 5 * k))])
    worst = 0.0
    for _ in range(2 * cfg.max_seq_len):
        feeds = [(k, rng.integers(0, cfg.vocab_size, rng.integers(1, 3))) for k in range(3)]
        logits = dec.step(feeds)
        for k in range(3):
            ctx = dec.context(k)
            full = model.forward(ctx[None], last_only=True)[0]
            worst = max(worst, float(np.abs(logits[k] - full).max()) / float(np.ptp(full)))
        greedy_cached = int(np.argmax(logits[0]))
        assert greedy_cached == int(np.argmax(model.forward(dec.context(0)[None],
                                                            last_only=True)[0]))
    assert all(dec.slides(k) >= 1 for k in range(3))
    assert worst <= 2e-5, worst


def test_rotary_table_has_no_position_tensor():
    plain, rot = Model(ModelConfig(**BASE)), Model(config("rotary"))
    assert "transformer.wpe.weight" in plain.param_names
    assert "transformer.wpe.weight" not in rot.param_names
    assert plain.num_params - rot.num_params == BASE["max_seq_len"] * BASE["d_model"]
    with pytest.raises(ValueError, match="even head_dim"):
        ModelConfig(**{**BASE, "d_model": 36}, position="rotary")   # head_dim 9


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_lattice_embeddings():
    cfg = ModelConfig(**{**BASE, "vocab_size": 4096, "max_seq_len": 512}, init="lattice")
    a, b = Model(cfg, seed=1), Model(cfg, seed=2)
    normal = Model(ModelConfig(**{**BASE, "vocab_size": 4096, "max_seq_len": 512}), seed=1)
    for name in ("transformer.wte.weight", "transformer.wpe.weight"):
        t = a.params[name]
        assert np.array_equal(t, b.params[name]), name          # no seed: a formula
        assert abs(float(t.mean())) < 2e-4, name                 # normal draws: 0.02/sqrt(n)
        assert abs(float(t.std()) - 0.02) < 2e-4, name
        # Low discrepancy: each column's points u = Phi(x / 0.02) fill [0,1) far more evenly
        # than random ones. Kolmogorov-Smirnov distance per column: random ~ 0.87/sqrt(n)
        # (0.014 at n = 4096); a Kronecker sequence's is O(log n / n).
        u = np.sort(_normal_cdf(t.astype(np.float64) / 0.02), axis=0)
        n = u.shape[0]
        ks = np.max(np.maximum(np.arange(1, n + 1)[:, None] / n - u,
                               u - np.arange(n)[:, None] / n), axis=0)
        assert ks.max() < 10 * math.log(n) / n, (name, ks.max())
        rnd = np.sort(_normal_cdf(normal.params[name].astype(np.float64) / 0.02), axis=0)
        ks_r = np.max(np.maximum(np.arange(1, n + 1)[:, None] / n - rnd,
                                 rnd - np.arange(n)[:, None] / n), axis=0)
        assert ks.mean() < ks_r.mean() / 3   # measured: 4.9x (n = 512), more at 4096
    # token and position rows differ (distinct primes), other tensors are the normal init's
    assert not np.allclose(a.params["transformer.wte.weight"][:512],
                           a.params["transformer.wpe.weight"])
    for name in a.param_names:
        if name not in ("transformer.wte.weight", "transformer.wpe.weight"):
            assert np.array_equal(a.params[name], normal.params[name]), name


def test_gpt2_export_refuses_each_option_by_name():
    from mpitrain.hf_export import refused_options
    assert refused_options(ModelConfig(**BASE)) == []
    for field, value in (("position", "rotary"), ("init", "lattice"),
                         ("attention_pattern", "ulam")):
        refused = refused_options(ModelConfig(**BASE, **{field: value}))
        assert any(field in r for r in refused), (field, refused)
    # a window changes nothing under dense attention, so GPT-2 represents it; under ulam it
    # is refused along with the pattern
    assert refused_options(ModelConfig(**BASE, attention_window=5)) == []
    assert len(refused_options(ModelConfig(**BASE, attention_pattern="ulam",
                                           attention_window=5))) == 2


def test_stored_form_holds_options_only_when_set():
    plain, cfg = ModelConfig(**BASE), config("all")
    assert set(plain.to_dict()) == set(BASE)      # files of the plain model keep their bytes
    assert cfg.to_dict() == {**BASE, **OPTIONS["all"]}
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(plain.to_dict()) == plain
