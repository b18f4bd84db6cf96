"""Helpers for the generation, infer, monitor and plot tests (no tests here): a small model
with O(1) logits saved as a real checkpoint, and a plain NumPy greedy decoder over the
reference model (tests/reference_gpt.py) with the kernel's context rule."""
import os

import numpy as np

import reference_gpt
from mpitrain import Model, ModelConfig
from mpitrain.checkpoint import save_checkpoint
from mpitrain.config import TrainConfig
from mpitrain.schedule import DataPosition
from mpitrain.tokenizer import Tokenizer

WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " lazy", " dog", "the",
         " and", " of", " to", " in", " is", " it", " that", "ing", "ed", " we", " you"]
TOKENIZER = Tokenizer(WORDS)                      # 1 special + 256 bytes + 20 words = 277 ids
CONFIG = ModelConfig(vocab_size=TOKENIZER.vocab_size, max_seq_len=16, d_model=32, n_layers=2,
                     n_heads=4, d_ff=64)

GREEDY_MARGIN = 2e-3   # least gap between the reference's best and second-best logit


def scaled_model(config=CONFIG, seed=1, scale=12.0, threads=1) -> Model:
    """A Model whose GPT-2 initialisation is scaled up so logits spread over several units
    (at std 0.02 they are ~1e-2 and argmax margins would be tiny)."""
    model = Model(config, seed=seed, threads=threads)
    for name in model.param_names:
        p = model.params[name]
        if p.ndim == 2:
            p *= scale
        elif name.endswith("bias"):
            p[...] = np.random.default_rng(seed).normal(0, 0.1, p.shape).astype(np.float32)
    return model


def save_model(path, model: Model, tokenizer=TOKENIZER, step=3):
    zeros = {n: np.zeros_like(model.params[n]) for n in model.param_names}
    save_checkpoint(path, model_config=model.config, train_config=TrainConfig.preset("tiny"),
                    params={n: model.params[n] for n in model.param_names},
                    optimizer_state={"m": zeros, "v": zeros}, step=step, epoch=0, data_position=DataPosition(0, 0),
                    rng_state={"seed": 0}, train_loss=5.0, val_loss=5.5, tokenizer=tokenizer)
    return str(path)


def reference_greedy(params, config, prompt, n_new, stop_id=None):
    """Greedy decoding with float64 NumPy and the whole context recomputed for every token.
    Context rule of kernels/decode.c: the prompt's newest max_seq_len ids; when appending
    would pass max_seq_len, keep the newest half (max_seq_len // 2) first."""
    T = config.max_seq_len
    ctx = [int(t) for t in prompt][-T:]
    out = []
    for _ in range(n_new):
        logits, _ = reference_gpt.forward(params, np.array([ctx]), config)
        nxt = int(np.argmax(logits[0, -1]))
        # the kernel's float32 logits are within GREEDY_MARGIN / 10 of these (the generation
        # tests' measured tolerance, 2e-5 of a spread of ~10): a closer runner-up could make
        # another BLAS kernel's argmax differ, so such a reference is refused
        top2 = np.sort(logits[0, -1])[-2:]
        assert top2[1] - top2[0] > GREEDY_MARGIN, ("argmax margin too small", top2)
        out.append(nxt)
        if nxt == stop_id:
            break
        if len(ctx) + 1 > T:
            ctx = ctx[-(T // 2):]
        ctx.append(nxt)
    return out


def tiny_run_dir(base, dataset, steps=10):
    """A finished tiny training run made by the real `mpirun -n 2 ... train` command."""
    from test_train_support import run_train, tiny_args

    run_dir = os.path.join(str(base), "run")
    args = tiny_args(dataset, run_dir)
    args[args.index("--max-steps") + 1] = steps
    proc = run_train(2, *args)
    assert proc.returncode == 0, proc.stderr
    return run_dir
