"""The checkpoint layout is plain PyTorch-compatible: /params is a GPT-2 state_dict and the Adam
moments are AdamW's exp_avg / exp_avg_sq, so a run saved and resumed continues bit for bit."""
import pathlib
import sys

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from torch_gpt import TorchGPT, train_step  # noqa: E402

from mpitrain import checkpoint as ckpt  # noqa: E402
from mpitrain.config import ModelConfig, TrainConfig  # noqa: E402
from mpitrain.schedule import DataPosition  # noqa: E402
from mpitrain.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.numerics

TOK = Tokenizer(["ab", "cd"])
CFG = ModelConfig(vocab_size=TOK.vocab_size, max_seq_len=8, d_model=16, n_layers=2, n_heads=2,
                  d_ff=32)


def _batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, CFG.vocab_size, (3, 9), generator=g)
    return x[:, :-1], x[:, 1:]


def _moments(net, opt):
    names = {p: n for n, p in net.named_parameters()}
    m = {names[p]: opt.state[p]["exp_avg"].numpy() for p in net.parameters()}
    v = {names[p]: opt.state[p]["exp_avg_sq"].numpy() for p in net.parameters()}
    return m, v


@pytest.mark.slow
def test_torch_run_saved_and_resumed_continues_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = TorchGPT(CFG, seed=3)
    opt = net.adamw(lr=1e-2)
    for step in range(1, 4):
        train_step(net, opt, *_batch(step))
    m, v = _moments(net, opt)
    path = tmp_path / "checkpoint_step_3.h5"
    ckpt.save_checkpoint(path, model_config=CFG, train_config=TrainConfig.preset("tiny"),
                         params=net.numpy_state(), optimizer_state={"m": m, "v": v},
                         step=3, epoch=0,
                         data_position=DataPosition(0, 9), rng_state=None, train_loss=None,
                         val_loss=None, tokenizer=TOK)
    straight = [train_step(net, opt, *_batch(s)) for s in (4, 5)]

    # Resume into fresh PyTorch objects from the file alone, via plain h5py (as any user would).
    with h5py.File(path, "r") as f:
        state = {n: torch.from_numpy(f["params"][n][()]) for n in f["params"]}
        moments = {k: {n: torch.from_numpy(f[f"optimizer/{k}"][n][()])
                       for n in f[f"optimizer/{k}"]} for k in "mv"}
        step = int(f.attrs["step"])
    net2 = TorchGPT(ckpt.load_checkpoint(path).model_config)  # architecture from the file
    net2.load_state_dict(state, strict=True)
    opt2 = net2.adamw(lr=1e-2)
    for n, p in net2.named_parameters():
        opt2.state[p] = {"step": torch.tensor(float(step)), "exp_avg": moments["m"][n].clone(),
                         "exp_avg_sq": moments["v"][n].clone()}
    resumed = [train_step(net2, opt2, *_batch(s)) for s in (4, 5)]
    assert resumed == straight
    for (n, a), b in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(a, b), n
    assert np.isfinite(straight).all()
