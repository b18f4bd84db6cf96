"""The whole Model (C kernel) against the NumPy reference GPT and against finite differences.

Tolerances: the kernel computes in float32, the reference in float64. Errors pass through the
whole network (LayerNorm, attention, softmax), where float32 bounds are far too loose to catch
anything, so the tolerances are measured worst cases with margin: atol/rtol 1e-5 on logits, rel
1e-6 on the loss, rtol 1e-3 / atol 1e-6 per gradient tensor (entries ~1e-3..1e-1). The worst
error measured with OpenBLAS's Haswell, Sandybridge and Nehalem kernels (MPITRAIN_TOL_LOG, see
tests/tolerances.py) is 1/14 of these tolerances or less in every test here.
"""
import numpy as np
import pytest

import reference_gpt as ref
from mpitrain import Model, ModelConfig, optim
from mpitrain.model import output_chunk_rows_for
from tolerances import assert_close, assert_scalar

pytestmark = pytest.mark.numerics

TINY = ModelConfig(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def perturbed_model(config=TINY, seed=1, threads=1, noise=0.05):
    """A model whose biases and LayerNorm parameters are not at their trivial init values, so
    every gradient path is exercised."""
    model = Model(config, seed=seed, threads=threads)
    rng = np.random.default_rng(seed + 100)
    for v in model.params.values():
        v += rng.normal(0, noise, v.shape).astype(np.float32)
    return model


def batch(config=TINY, B=3, T=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.vocab_size, (B, T)).astype(np.int32),
            rng.integers(0, config.vocab_size, (B, T)).astype(np.int32))


def assert_grads_close(got, want, names, rtol=1e-3, atol=1e-6):
    for name in names:
        assert_close(got[name], want[name], rtol=rtol, atol=atol, err_msg=name)


# ---- parameter table, arenas, initialisation ---------------------------------------------------

def test_parameter_table_follows_gpt2_names_and_shapes():
    model = Model(TINY)
    C, F, V, L = TINY.d_model, TINY.d_ff, TINY.vocab_size, TINY.n_layers
    want = [("transformer.wte.weight", (V, C)), ("transformer.wpe.weight", (TINY.max_seq_len, C))]
    for l in range(L):
        h = f"transformer.h.{l}."
        want += [(h + "ln_1.weight", (C,)), (h + "ln_1.bias", (C,)),
                 (h + "attn.c_attn.weight", (3 * C, C)), (h + "attn.c_attn.bias", (3 * C,)),
                 (h + "attn.c_proj.weight", (C, C)), (h + "attn.c_proj.bias", (C,)),
                 (h + "ln_2.weight", (C,)), (h + "ln_2.bias", (C,)),
                 (h + "mlp.c_fc.weight", (F, C)), (h + "mlp.c_fc.bias", (F,)),
                 (h + "mlp.c_proj.weight", (C, F)), (h + "mlp.c_proj.bias", (C,))]
    want += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,)),
             ("lm_head.weight", (V, C))]
    assert model.param_names == [n for n, _ in want]
    assert [model.params[n].shape for n, _ in want] == [s for _, s in want]
    assert model.num_params == sum(int(np.prod(s)) for _, s in want) == model.param_buffer.size


def test_seed_preset_size():
    # The seed preset: 33.8M parameters at vocabulary 30,000 (without allocating the model).
    c = ModelConfig.preset("seed")
    C, F, L = c.d_model, c.d_ff, c.n_layers
    n = 2 * c.vocab_size * C + c.max_seq_len * C + 2 * C + L * (
        4 * C + 3 * C * C + 3 * C + C * C + C + F * C + F + C * F + C)
    assert round(n / 1e6, 1) == 33.8


def test_views_are_zero_copy_into_the_arenas():
    model = Model(TINY)
    pairs = [(model.params, model.param_buffer), (model.grads, model.grad_buffer)]
    pairs += [(model.optimizer_state[s], model.optimizer_buffers[s]) for s in optim.ADAMW.state]
    assert model.optimizer_arenas == [model.optimizer_buffers[s] for s in optim.ADAMW.state]
    for views, buf in pairs:
        assert buf.dtype == np.float32 and buf.ndim == 1 and buf.flags.c_contiguous
        for v in views.values():
            assert np.shares_memory(v, buf)
    model.params["lm_head.weight"][...] = 0.0  # the kernel sees writes through the views
    logits = model.forward(batch()[0])
    assert np.all(logits == 0.0)
    with pytest.raises(AttributeError):  # rebinding would leave the kernel on the old memory
        model.param_buffer = np.zeros_like(model.param_buffer)
    model.param_buffer[...] = 0.0  # in place is the way
    assert np.all(model.forward(batch()[0]) == 0.0)


def test_gpt2_initialisation():
    model = Model(ModelConfig(vocab_size=500, max_seq_len=64, d_model=64, n_layers=3,
                              n_heads=4, d_ff=256), seed=7)
    L = 3
    for name, p in model.params.items():
        if name.endswith("bias"):
            assert np.all(p == 0), name
        elif ".ln_" in name:
            assert np.all(p == 1), name
        else:
            std = 0.02 / np.sqrt(2 * L) if name.endswith("c_proj.weight") else 0.02
            # the sample std of n normals is within 5/sqrt(2n) relative of sigma (5 sigma)
            assert abs(p.std() / std - 1) < 5 / np.sqrt(2 * p.size), name
            assert abs(p.mean()) < 5 * std / np.sqrt(p.size), name
    again = Model(model.config, seed=7)
    np.testing.assert_array_equal(again.param_buffer, model.param_buffer)
    other = Model(model.config, seed=8)
    assert not np.array_equal(other.param_buffer, model.param_buffer)


# ---- against the NumPy reference ---------------------------------------------------------------

def test_forward_backward_matches_reference():
    model = perturbed_model()
    inputs, targets = batch()
    loss = model.forward_backward(inputs, targets)
    r_loss, r_logits, r_grads = ref.loss_and_grads(model.params, inputs, targets, TINY)
    assert_scalar(loss, r_loss, rel=1e-6)
    assert_grads_close(model.grads, r_grads, model.param_names)
    assert_close(model.forward(inputs), r_logits, rtol=1e-5, atol=1e-5)
    assert_close(model.forward(inputs, last_only=True), r_logits[:, -1],
                 rtol=1e-5, atol=1e-5)
    assert_scalar(model.loss(inputs, targets), r_loss, rel=1e-6)


def test_full_sequence_length_and_single_token():
    model = perturbed_model()
    for B, T in ((2, TINY.max_seq_len), (1, 1)):
        inputs, targets = batch(B=B, T=T, seed=T)
        loss = model.forward_backward(inputs, targets)
        r_loss, _, r_grads = ref.loss_and_grads(model.params, inputs, targets, TINY)
        assert_scalar(loss, r_loss, rel=1e-6)
        assert_grads_close(model.grads, r_grads, model.param_names)


def test_output_layer_in_several_chunks():
    # The output layer runs through chunks of rows (kernels/loss.c). At the seed vocabulary the
    # default 64 MB budget gives 544-row chunks, more than a small test batch: lower the budget
    # so that the 320 rows run as 128 + 128 + 64 (the last chunk partial), on 2 threads.
    cfg = ModelConfig(vocab_size=30000, max_seq_len=64, d_model=16, n_layers=1, n_heads=2,
                      d_ff=32)
    assert output_chunk_rows_for(16 << 20, cfg.vocab_size) == 544   # the default budget
    model = perturbed_model(cfg, threads=2)
    assert model.output_chunk_budget == 16 << 20
    model.output_chunk_budget = 128 * cfg.vocab_size + 100
    assert output_chunk_rows_for(model.output_chunk_budget, cfg.vocab_size) == 128
    inputs, targets = batch(cfg, B=5, T=64, seed=3)
    loss = model.forward_backward(inputs, targets)
    rows = model.output_chunk_rows
    assert rows == 128 and -(-inputs.size // rows) == 3            # really three chunks
    r_loss, r_logits, r_grads = ref.loss_and_grads(model.params, inputs, targets, cfg)
    # the same measured tolerances as test_forward_backward_matches_reference
    assert_scalar(loss, r_loss, rel=1e-6, err_msg="loss")
    assert_grads_close(model.grads, r_grads, model.param_names)
    # forward-only loss goes through the same chunks (groups of 2048 rows: one group here)
    assert_scalar(model.loss(inputs, targets), r_loss, rel=1e-6, err_msg="eval loss")
    assert model.output_chunk_rows == 128
    assert_close(model.forward(inputs), r_logits, rtol=1e-5, atol=1e-5)


def test_forward_only_calls_in_several_groups():
    # forward-only calls run in groups of 2048 rows: 130 x 16 rows make two groups
    model = perturbed_model(threads=2)
    inputs, targets = batch(B=130, T=16, seed=4)
    r_logits = ref.forward(model.params, inputs, TINY)[0]
    want = float(ref.token_losses(r_logits, targets).mean())
    assert_scalar(model.loss(inputs, targets), want, rel=1e-6)
    assert_close(model.forward(inputs), r_logits, rtol=1e-5, atol=1e-5)


def test_grad_scale_and_accumulate():
    # The same gradient computed in different ways. grad_scale 1/32 or 1 differ by a power of
    # two, which scales every rounded product and sum exactly (the step is linear in the
    # scale; no entry here is near underflow): bitwise equal after the factor 32. As 1 + 3
    # windows accumulated (other GEMM shapes, so other BLAS blocking and summation order) the
    # entries differ by float32 rounding; each sums many terms that cancel, so its error scales
    # with the tensor's magnitude, not with the entry: per tensor atol = 1e-5 * max |entry|
    # (measured worst 5e-7 of that with the Haswell, Sandybridge and Nehalem kernels: 20x
    # margin). A wrong scale or an overwrite instead of an addition is off by O(1).
    model = perturbed_model()
    inputs, targets = batch(B=4)
    assert inputs.size == 32
    model.forward_backward(inputs, targets)
    mean_grads = {n: g.copy() for n, g in model.grads.items()}
    # grad_scale multiplies the gradient of the token-loss sum
    model.forward_backward(inputs, targets, grad_scale=1.0)
    for name, g in model.grads.items():
        np.testing.assert_array_equal(g, 32 * mean_grads[name], err_msg=name)
    # the step invariant: two halves accumulated with 1/(global tokens) = the whole batch
    model.forward_backward(inputs[:1], targets[:1], grad_scale=1 / inputs.size)
    model.forward_backward(inputs[1:], targets[1:], grad_scale=1 / inputs.size, accumulate=True)
    assert_grads_scaled(model.grads, mean_grads, 1.0, rel=1e-5)
    # accumulate adds onto whatever is there
    model.forward_backward(inputs, targets, accumulate=True)
    assert_grads_scaled(model.grads, mean_grads, 2.0, rel=1e-5)


def assert_grads_scaled(got, want, factor, rel):
    """got == factor * want per tensor, to rel * (the tensor's largest |entry|) absolute."""
    for name, g in got.items():
        w = factor * want[name].astype(np.float64)
        assert_close(g, w, rtol=0, atol=rel * float(np.abs(w).max()), err_msg=name)


def test_evaluation_leaves_gradients_and_counters_alone():
    model = perturbed_model()
    inputs, targets = batch()
    assert model.counters() == (0, 0)
    model.forward_backward(inputs, targets)
    model.forward_backward(inputs[:2], targets[:2], accumulate=True)
    grads = model.grad_buffer.copy()
    model.loss(inputs, targets)
    model.forward(inputs)
    np.testing.assert_array_equal(model.grad_buffer, grads)
    assert model.counters() == (2, 5)


# ---- finite differences ------------------------------------------------------------------------

def test_reference_gradients_match_finite_differences_float64():
    # The reference is float64: central differences with h = 1e-6 have truncation error
    # O(h^2) ~ 1e-12 and rounding error ~ 1e-16 / h ~ 1e-10 relative to the loss (~4): within
    # rel 1e-5 + abs 1e-9 of the analytic gradient.
    model = perturbed_model()
    inputs, targets = batch(B=2, T=6)
    params = {n: p.astype(np.float64) for n, p in model.params.items()}
    _, _, grads = ref.loss_and_grads(params, inputs, targets, TINY)
    rng = np.random.default_rng(5)
    h = 1e-6
    for name in model.param_names:
        for idx in {tuple(rng.integers(0, s) for s in params[name].shape) for _ in range(3)}:
            old = params[name][idx]
            params[name][idx] = old + h
            up = ref.token_losses(ref.forward(params, inputs, TINY)[0], targets).mean()
            params[name][idx] = old - h
            down = ref.token_losses(ref.forward(params, inputs, TINY)[0], targets).mean()
            params[name][idx] = old
            assert (up - down) / (2 * h) == pytest.approx(grads[name][idx], rel=1e-5, abs=1e-9), \
                (name, idx)


def test_kernel_gradients_match_finite_differences_float32():
    # Float32 FD on the kernel itself: the loss is a double sum of float32 token losses with
    # absolute error ~1e-7, so with h = 1e-2 the FD error is ~1e-5 plus O(h^2) truncation.
    # We check each tensor's largest-gradient entry and two random entries with
    # |fd - g| <= 5e-5 + 2e-2 |g|.
    model = perturbed_model(noise=0.1)
    inputs, targets = batch(B=2, T=8, seed=9)
    model.forward_backward(inputs, targets)
    grads = {n: g.copy() for n, g in model.grads.items()}
    rng = np.random.default_rng(6)
    h = 1e-2
    for name in model.param_names:
        p, g = model.params[name], grads[name]
        picks = [np.unravel_index(np.argmax(np.abs(g)), g.shape)]
        picks += [tuple(rng.integers(0, s) for s in g.shape) for _ in range(2)]
        for idx in picks:
            old = p[idx]
            p[idx] = old + h
            up = model.loss(inputs, targets)
            p[idx] = old - h
            down = model.loss(inputs, targets)
            p[idx] = old
            fd = (up - down) / (2 * h)
            assert abs(fd - g[idx]) <= 5e-5 + 2e-2 * abs(g[idx]), (name, idx, fd, g[idx])


# ---- input checks ------------------------------------------------------------------------------

def test_refuses_bad_inputs_before_c():
    model = Model(TINY)
    inputs, targets = batch()
    with pytest.raises(TypeError):
        model.forward_backward(inputs.astype(np.float32), targets)
    with pytest.raises(TypeError):
        model.forward([[1, 2, 3]])
    with pytest.raises(ValueError, match="token ids"):
        model.forward_backward(inputs, targets + TINY.vocab_size)
    with pytest.raises(ValueError, match="token ids"):
        model.loss(inputs - 100, targets)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(np.zeros((1, TINY.max_seq_len + 1), np.int32))
    with pytest.raises(ValueError, match="differs"):
        model.forward_backward(inputs, targets[:, :-1])
    with pytest.raises(ValueError, match="shape"):
        model.forward(inputs[0])
    with pytest.raises(ValueError):
        Model(TINY, threads=0)
    with pytest.raises(ValueError):
        Model(TINY, seed=-1)
    with pytest.raises(TypeError):
        Model(TINY.to_dict())
    assert model.counters() == (0, 0)


def test_accepts_other_integer_dtypes_and_layouts():
    model = perturbed_model()
    inputs, targets = batch()
    want = model.loss(inputs, targets)
    assert model.loss(inputs.astype(np.uint16), targets.astype(np.int64)) == want
    wide = np.zeros((3, 16), np.int64)
    wide[:, ::2] = inputs
    assert model.loss(wide[:, ::2], targets) == want  # non-contiguous: copied, not refused
