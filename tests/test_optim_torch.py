"""The kernel's AdamW and clipping against torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.

Skips when torch is absent. The parameters are a small model's tensors in its arena, in the
usual two groups (decay on tensors of 2+ dimensions, none on vectors).
Tolerances: our update follows PyTorch's float32 operation order, but PyTorch's vector kernels
fuse the moment updates (fma) and take a vector sqrt that is not always correctly rounded, so
moments differ by up to 2 float32 ulps of their terms (m: gradients ~1e-2, atol 2e-9; v: terms
~1e-4, atol 3e-11) and parameters by up to 2 ulps (rtol 1e-6, atol 1e-8: measured max 1.2e-7
at |p| ~ 1). A wrong decay, bias correction or moment would show up at lr * wd * |p| ~ 5e-5. PyTorch's
norm is float32 (accumulated in double per tensor, then a float32 norm of the per-tensor norms)
and ours double: rtol 1e-6 on the norm and the clipped gradients.
"""
import numpy as np
import pytest

from mpitrain import Model, ModelConfig, optim
from tolerances import assert_close

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.numerics

CFG = ModelConfig(vocab_size=101, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)


def torch_params(model, arena):
    """Torch parameters that start as copies of the model's tensors in `arena`."""
    off, out = 0, []
    for name in model.param_names:
        shape = model.param_shapes[name]
        k = int(np.prod(shape))
        out.append(torch.nn.Parameter(torch.from_numpy(arena[off:off + k].reshape(shape).copy())))
        off += k
    return out


def set_grads(tp, g):
    off = 0
    for t in tp:
        t.grad = torch.from_numpy(g[off:off + t.numel()].reshape(t.shape).copy())
        off += t.numel()


def flatten(tensors):
    return np.concatenate([t.detach().numpy().ravel() for t in tensors])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_ten_adamw_steps_match_torch(threads):
    model = Model(CFG, threads=threads)
    rng = np.random.default_rng(11)
    model.param_buffer[...] = rng.normal(0, 0.5, model.num_params)
    tp = torch_params(model, model.param_buffer)
    groups = [{"params": [t for t in tp if t.dim() >= 2], "weight_decay": 0.05},
              {"params": [t for t in tp if t.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 11):
        g = rng.normal(0, 1e-2, model.num_params).astype(np.float32)
        lr = 2e-3 * min(1.0, step / 4)  # a warmup: lr changes between steps
        for group in opt.param_groups:
            group["lr"] = lr
        set_grads(tp, g)
        opt.step()
        model.grad_buffer[...] = g
        optim.update(model, lr=lr, step=step, norm=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
                     weight_decay=0.05)
        assert_close(model.param_buffer, flatten(tp), rtol=1e-6, atol=1e-8)
    m, v = (model.optimizer_buffers[s] for s in ("m", "v"))
    assert_close(m, flatten(opt.state[t]["exp_avg"] for t in tp), rtol=1e-6, atol=2e-9)
    assert_close(v, flatten(opt.state[t]["exp_avg_sq"] for t in tp), rtol=1e-6, atol=3e-11)


@pytest.mark.parametrize("scale,max_norm", [(1.0, 1.0), (1e-3, 1.0), (0.3, 2.5)])
def test_clip_matches_torch(scale, max_norm):
    model = Model(CFG, threads=2)
    rng = np.random.default_rng(12)
    g = (rng.normal(0, 1, model.num_params) * scale).astype(np.float32)
    tp = torch_params(model, np.zeros(model.num_params, np.float32))
    set_grads(tp, g)
    expected = float(torch.nn.utils.clip_grad_norm_(tp, max_norm))
    model.grad_buffer[...] = g
    norm = optim.grad_norm(model)
    optim.update(model, lr=0.0, step=1, norm=norm, max_norm=max_norm)  # lr 0: clipping only
    assert norm == pytest.approx(expected, rel=1e-6)
    assert_close(model.grad_buffer, flatten(t.grad for t in tp), rtol=1e-6, atol=0)


@pytest.mark.slow
def test_ten_training_steps_of_the_model_match_torch():
    """The whole chain as the trainer runs it (kernel forward+backward, clip, AdamW with decay
    chosen by the model's own tensor table) against TorchGPT + clip_grad_norm_ + AdamW from the
    same weights. Float32 summation orders differ between the two and Adam's normalised steps
    carry that along: measured loss differences <= 1.3e-7 and norm differences <= 6.5e-7
    relative, parameters <= 8e-6 absolute; we allow rtol 1e-6 (loss), 3e-6 (norm) and atol 5e-5
    (parameters). A decay on LayerNorm weights alone would move them by lr * wd = 3e-4 a step."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
    from torch_gpt import TorchGPT, train_step

    cfg = CFG
    model = Model(cfg, seed=5, threads=2)
    net = TorchGPT(cfg).load_numpy(model.params)
    opt = net.adamw(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    w = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 17))
    x, y = w[:, :-1], w[:, 1:]  # one batch, repeated: the loss falls visibly
    ours, theirs = [], []
    for step in range(1, 11):
        ours.append(model.forward_backward(x.astype(np.int32), y.astype(np.int32)))
        norm = optim.grad_norm(model)
        optim.update(model, lr=3e-3, step=step, norm=norm, max_norm=0.5,  # every step clips
                     weight_decay=0.1)
        loss, t_norm = train_step(net, opt, torch.from_numpy(x), torch.from_numpy(y), clip=0.5)
        theirs.append(loss)
        assert norm == pytest.approx(t_norm, rel=3e-6)
        assert norm > 0.5
    assert_close(ours, theirs, rtol=1e-6)
    assert ours[-1] < ours[0] - 0.5
    for name, p in net.numpy_state().items():
        assert_close(model.params[name], p, rtol=0, atol=5e-5, err_msg=name)
