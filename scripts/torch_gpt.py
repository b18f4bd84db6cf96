"""A compact plain-PyTorch GPT with mpitrain's architecture and GPT-2 state_dict names.

The reference the kernel is compared against (tests) and timed against (scripts/bench_kernel.py).
Architecture (docs/DESIGN.md, "The model"): token + learned position embeddings, n_layers pre-LayerNorm
blocks (LN eps 1e-5 -> causal multi-head attention, scale 1/sqrt(head_dim) -> residual;
LN -> Linear d->d_ff -> GELU (tanh) -> Linear d_ff->d -> residual), final LayerNorm, untied
lm_head without bias, mean cross-entropy over all targets. Linear weights are [out, in]
(nn.Linear's layout), so `load_numpy` takes a kernel Model's `.params` as they are.

Usage from tests or scripts (scripts/ on sys.path):
    from torch_gpt import TorchGPT
    net = TorchGPT(config)                  # config: anything with ModelConfig's fields
    net.load_numpy(model.params)            # dict name -> np.ndarray, GPT-2 names
    logits, loss = net(inputs, targets)     # inputs, targets: int64 tensors [B, T]
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-5


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)  # q, k, v stacked along the output
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x):  # x (B,T,C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B,T,C) -> (B,nh,T,hd)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(hd)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_ff)
        self.c_proj = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=LN_EPS)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model, eps=LN_EPS)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, config, seed=0):
        super().__init__()
        c = config
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.d_model),
            wpe=nn.Embedding(c.max_seq_len, c.d_model),
            h=nn.ModuleList(Block(c.d_model, c.n_heads, c.d_ff) for _ in range(c.n_layers)),
            ln_f=nn.LayerNorm(c.d_model, eps=LN_EPS),
        ))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self._init_gpt2(seed)

    @torch.no_grad()
    def _init_gpt2(self, seed):
        """GPT-2 initialisation: normal(0, 0.02); the residual output projections (attn.c_proj,
        mlp.c_proj) scaled by 1/sqrt(2 n_layers); biases zero; LayerNorm weights one."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0.0, resid_std, generator=gen)
            elif "ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)

    def forward(self, inputs, targets=None):
        """inputs, targets (B,T) int64 -> logits (B,T,V), mean cross-entropy (or None)."""
        B, T = inputs.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len {self.config.max_seq_len}")
        pos = torch.arange(T, device=inputs.device)
        x = self.transformer.wte(inputs) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def load_numpy(self, arrays):
        """Copy weights from a dict name -> np.ndarray (GPT-2 names, exact shapes, all present)."""
        own = dict(self.named_parameters())
        missing, extra = set(own) - set(arrays), set(arrays) - set(own)
        if missing or extra:
            raise KeyError(f"state mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for name, p in own.items():
            a = np.asarray(arrays[name])
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"{name}: expected shape {tuple(p.shape)}, got {a.shape}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
        return self

    def numpy_state(self):
        """dict name -> float32 np.ndarray copies of the parameters (GPT-2 names)."""
        return {n: p.detach().numpy().copy() for n, p in self.named_parameters()}

    def numpy_grads(self):
        """dict name -> float32 np.ndarray copies of the gradients (zeros where none)."""
        return {n: (p.grad.numpy().copy() if p.grad is not None
                    else np.zeros(tuple(p.shape), np.float32))
                for n, p in self.named_parameters()}

    def adamw(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        """torch.optim.AdamW with weight decay on tensors of 2+ dimensions only (as the kernel)."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=lr, betas=betas, eps=eps)


def train_step(net, opt, inputs, targets, clip=1.0):
    """One optimizer step as the trainer does it: loss, backward, clip, AdamW. Returns
    (loss, norm before clipping)."""
    opt.zero_grad(set_to_none=True)
    _, loss = net(inputs, targets)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip) if clip > 0 else torch.nan
    opt.step()
    return loss.item(), float(norm)
