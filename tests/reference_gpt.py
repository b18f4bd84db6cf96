"""An independent NumPy GPT (float64 by default): forward, loss and a hand-written backward.

The definition the C kernel is checked against (tests/test_model*.py) and that other tests may
import. Same architecture as docs/DESIGN.md, "The model": token + learned position embeddings, pre-LN blocks
(LN eps 1e-5 -> causal multi-head attention, scale 1/sqrt(head_dim) -> residual; LN -> c_fc ->
GELU (tanh) -> c_proj -> residual), final LN, untied lm_head (no bias), cross-entropy.
Parameters are a dict name -> array with GPT-2 state_dict names and [out, in] linear weights.

    loss, logits, grads = loss_and_grads(params, inputs, targets, config)
grads are d(sum of token losses * grad_scale)/d(param), grad_scale defaulting to 1/(B*T),
so with the default they are the gradients of the mean loss.

Options (docs/DESIGN.md, "The model"): config.position == "rotary" turns q and k (rotate-half
pairs, base 10,000) and drops the position table; config.attention_pattern == "ulam" lets row i
see key j only at distance i - j <= attention_window or at a prime distance.
"""
import numpy as np

LN_EPS = 1e-5
GELU_K = np.sqrt(2.0 / np.pi)


def layernorm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + LN_EPS)
    xhat = (x - mu) * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dy, w, cache):
    """-> dx, dw, db for y = LN(x) given dy (..., C)."""
    xhat, rstd = cache
    dxhat = dy * w
    dx = rstd * (dxhat - dxhat.mean(-1, keepdims=True)
                 - xhat * (dxhat * xhat).mean(-1, keepdims=True))
    axes = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axes), dy.sum(axes)


def gelu(x):
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + 0.044715 * x ** 3)))


def gelu_backward(x, dy):
    t = np.tanh(GELU_K * (x + 0.044715 * x ** 3))
    du = GELU_K * (1.0 + 3 * 0.044715 * x ** 2)
    return dy * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)


def rope_tables(T, hs, dtype=np.float64):
    """cos, sin (T, hs): angle pos * 10000^(-i/(hs/2)) for pair i, repeated for both halves."""
    half = hs // 2
    ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(half) / half)[None, :]
    return (np.concatenate([np.cos(ang)] * 2, -1).astype(dtype),
            np.concatenate([np.sin(ang)] * 2, -1).astype(dtype))


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


def is_prime(n):
    return n >= 2 and all(n % p for p in range(2, int(n ** 0.5) + 1))


def attention_mask(T, config=None):
    """(T,T) bool: row i sees key j."""
    causal = np.tril(np.ones((T, T), bool))
    if getattr(config, "attention_pattern", "dense") != "ulam":
        return causal
    w = config.attention_window
    d = np.arange(T)[:, None] - np.arange(T)[None, :]
    prime = np.array([is_prime(n) for n in range(T)])
    return causal & ((d <= w) | prime[np.clip(d, 0, T - 1)])


def attention(qkv, n_heads, config=None):
    """qkv (B,T,3C) -> y (B,T,C), cache. Causal softmax of q.k / sqrt(head_dim)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_heads
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, n_heads, hs).transpose(0, 2, 1, 3)
               for i in range(3))
    rope = None
    if getattr(config, "position", "learned") == "rotary":
        rope = rope_tables(T, hs, q.dtype)
        q, k = (t * rope[0] + rotate_half(t) * rope[1] for t in (q, k))
    scale = 1.0 / np.sqrt(hs)
    s = q @ k.transpose(0, 1, 3, 2) * scale                      # (B,NH,T,T)
    s = np.where(attention_mask(T, config), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y, (q, k, v, p, scale, rope)


def attention_backward(dy, cache):
    """dy (B,T,C) -> dqkv (B,T,3C)."""
    q, k, v, p, scale, rope = cache
    B, NH, T, hs = q.shape
    dyh = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ dyh
    dp = dyh @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True)) * scale
    dq = ds @ k
    dk = ds.transpose(0, 1, 3, 2) @ q
    if rope is not None:   # the transpose of the turn: the opposite turn
        dq, dk = (t * rope[0] - rotate_half(t) * rope[1] for t in (dq, dk))
    back = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # noqa: E731
    return np.concatenate([back(dq), back(dk), back(dv)], axis=-1)


def _p(params, name, dtype):
    return np.asarray(params[name], dtype=dtype)


def forward(params, inputs, config, dtype=np.float64):
    """-> logits (B,T,V), cache for backward."""
    B, T = inputs.shape
    P = lambda n: _p(params, n, dtype)  # noqa: E731
    x = P("transformer.wte.weight")[inputs]
    if "transformer.wpe.weight" in params:
        x = x + P("transformer.wpe.weight")[:T]
    blocks = []
    for l in range(config.n_layers):
        h = f"transformer.h.{l}."
        a, ln1 = layernorm(x, P(h + "ln_1.weight"), P(h + "ln_1.bias"))
        qkv = a @ P(h + "attn.c_attn.weight").T + P(h + "attn.c_attn.bias")
        y, att = attention(qkv, config.n_heads, config)
        x2 = x + y @ P(h + "attn.c_proj.weight").T + P(h + "attn.c_proj.bias")
        b, ln2 = layernorm(x2, P(h + "ln_2.weight"), P(h + "ln_2.bias"))
        f = b @ P(h + "mlp.c_fc.weight").T + P(h + "mlp.c_fc.bias")
        g = gelu(f)
        x3 = x2 + g @ P(h + "mlp.c_proj.weight").T + P(h + "mlp.c_proj.bias")
        blocks.append((a, ln1, y, att, b, ln2, f, g))
        x = x3
    z, lnf = layernorm(x, P("transformer.ln_f.weight"), P("transformer.ln_f.bias"))
    logits = z @ P("lm_head.weight").T
    return logits, (inputs, blocks, z, lnf)


def token_losses(logits, targets):
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]


def loss_and_grads(params, inputs, targets, config, grad_scale=None, dtype=np.float64):
    """-> (mean loss, logits, grads dict) in `dtype`."""
    B, T = inputs.shape
    P = lambda n: _p(params, n, dtype)  # noqa: E731
    logits, (inputs, blocks, z, lnf) = forward(params, inputs, config, dtype)
    loss = float(token_losses(logits, targets).mean())
    scale = 1.0 / (B * T) if grad_scale is None else grad_scale
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    dlogits = prob
    np.put_along_axis(dlogits, targets[..., None],
                      np.take_along_axis(dlogits, targets[..., None], -1) - 1.0, -1)
    dlogits *= scale
    G = {}
    G["lm_head.weight"] = dlogits.reshape(B * T, -1).T @ z.reshape(B * T, -1)
    dz = dlogits @ P("lm_head.weight")
    dx, G["transformer.ln_f.weight"], G["transformer.ln_f.bias"] = \
        layernorm_backward(dz, P("transformer.ln_f.weight"), lnf)
    flat = lambda t: t.reshape(B * T, -1)  # noqa: E731
    for l in reversed(range(config.n_layers)):
        h = f"transformer.h.{l}."
        a, ln1, y, att, b, ln2, f, g = blocks[l]
        # x3 = x2 + g @ Wfp^T + bfp
        G[h + "mlp.c_proj.weight"] = flat(dx).T @ flat(g)
        G[h + "mlp.c_proj.bias"] = flat(dx).sum(0)
        df = gelu_backward(f, dx @ P(h + "mlp.c_proj.weight"))
        G[h + "mlp.c_fc.weight"] = flat(df).T @ flat(b)
        G[h + "mlp.c_fc.bias"] = flat(df).sum(0)
        db_, G[h + "ln_2.weight"], G[h + "ln_2.bias"] = \
            layernorm_backward(df @ P(h + "mlp.c_fc.weight"), P(h + "ln_2.weight"), ln2)
        dx2 = dx + db_
        # x2 = x + y @ Wp^T + bp
        G[h + "attn.c_proj.weight"] = flat(dx2).T @ flat(y)
        G[h + "attn.c_proj.bias"] = flat(dx2).sum(0)
        dqkv = attention_backward(dx2 @ P(h + "attn.c_proj.weight"), att)
        G[h + "attn.c_attn.weight"] = flat(dqkv).T @ flat(a)
        G[h + "attn.c_attn.bias"] = flat(dqkv).sum(0)
        da, G[h + "ln_1.weight"], G[h + "ln_1.bias"] = \
            layernorm_backward(dqkv @ P(h + "attn.c_attn.weight"), P(h + "ln_1.weight"), ln1)
        dx = dx2 + da
    dwte = np.zeros_like(P("transformer.wte.weight"))
    np.add.at(dwte, inputs.reshape(-1), flat(dx))
    G["transformer.wte.weight"] = dwte
    if "transformer.wpe.weight" in params:
        dwpe = np.zeros_like(P("transformer.wpe.weight"))
        dwpe[:T] = dx.sum(0)
        G["transformer.wpe.weight"] = dwpe
    return loss, logits, G
