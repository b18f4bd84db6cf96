"""The kernel's AdamW and clipping against torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.

Skips when torch is absent. The parameters are the usual two groups (decay on tensors of 2+
dimensions, none on vectors), laid out back to back in one flat arena as the model does.
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

from mpitrain import optim
from tolerances import assert_close

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.numerics

SHAPES = [(64, 32), (32,), (32,), (96, 32), (96,), (5, 2, 3), (200, 32)]


def torch_params(flat):
    """Torch parameters that start as copies of the slices of flat (shapes SHAPES)."""
    out, off = [], 0
    for s in SHAPES:
        k = int(np.prod(s))
        out.append(torch.nn.Parameter(torch.from_numpy(flat[off:off + k].reshape(s).copy())))
        off += k
    return out


def flatten(tensors):
    return np.concatenate([t.detach().numpy().ravel() for t in tensors])


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_ten_adamw_steps_match_torch(threads):
    seg = optim.decay_segments(SHAPES)
    n = seg.size
    rng = np.random.default_rng(11)
    p = rng.normal(0, 0.5, n).astype(np.float32)
    m = np.zeros(n, np.float32)
    v = np.zeros(n, np.float32)
    tp = torch_params(p)
    groups = [{"params": [t for t in tp if t.dim() >= 2], "weight_decay": 0.05},
              {"params": [t for t in tp if t.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 11):
        g = rng.normal(0, 1e-2, n).astype(np.float32)
        lr = 2e-3 * min(1.0, step / 4)  # a warmup: lr changes between steps
        for group in opt.param_groups:
            group["lr"] = lr
        off = 0
        for t in tp:
            t.grad = torch.from_numpy(g[off:off + t.numel()].reshape(t.shape).copy())
            off += t.numel()
        opt.step()
        optim.adamw_step(p, g, m, v, lr=lr, step=step, beta1=0.9, beta2=0.95, eps=1e-8,
                         weight_decay=0.05, segments=seg, threads=threads)
        assert_close(p, flatten(tp), rtol=1e-6, atol=1e-8)
    assert_close(m, flatten(opt.state[t]["exp_avg"] for t in tp),
                 rtol=1e-6, atol=2e-9)
    assert_close(v, flatten(opt.state[t]["exp_avg_sq"] for t in tp),
                 rtol=1e-6, atol=3e-11)


@pytest.mark.parametrize("scale,max_norm", [(1.0, 1.0), (1e-3, 1.0), (0.3, 2.5)])
def test_clip_matches_torch(scale, max_norm):
    n = sum(int(np.prod(s)) for s in SHAPES)
    rng = np.random.default_rng(12)
    g = (rng.normal(0, 1, n) * scale).astype(np.float32)
    tp = torch_params(np.zeros(n, np.float32))
    off = 0
    for t in tp:
        t.grad = torch.from_numpy(g[off:off + t.numel()].reshape(t.shape).copy())
        off += t.numel()
    expected = float(torch.nn.utils.clip_grad_norm_(tp, max_norm))
    norm = optim.clip_grad_norm(g, max_norm, threads=2)
    assert norm == pytest.approx(expected, rel=1e-6)
    assert_close(g, flatten(t.grad for t in tp), rtol=1e-6, atol=0)


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

    from mpitrain import Model, ModelConfig

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
    from torch_gpt import TorchGPT, train_step

    cfg = ModelConfig(vocab_size=101, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    model = Model(cfg, seed=5, threads=2)
    net = TorchGPT(cfg).load_numpy(model.params)
    opt = net.adamw(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    w = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 17))
    x, y = w[:, :-1], w[:, 1:]  # one batch, repeated: the loss falls visibly
    ours, theirs = [], []
    for step in range(1, 11):
        ours.append(model.forward_backward(x.astype(np.int32), y.astype(np.int32)))
        norm = model.clip_grad_norm(0.5)  # small enough that every step clips
        model.adamw_step(3e-3, step, weight_decay=0.1)
        loss, t_norm = train_step(net, opt, torch.from_numpy(x), torch.from_numpy(y), clip=0.5)
        theirs.append(loss)
        assert norm == pytest.approx(t_norm, rel=3e-6)
        assert norm > 0.5
    assert_close(ours, theirs, rtol=1e-6)
    assert ours[-1] < ours[0] - 0.5
    for name, p in net.numpy_state().items():
        assert_close(model.params[name], p, rtol=0, atol=5e-5, err_msg=name)
