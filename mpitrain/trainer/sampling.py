"""The text sample Node Zero shows at each evaluation.

The prompt goes through the kernel's cached decoding (mpitrain/generate.py, one sequence) with
the context limited to the training's seq_len (beyond it the context keeps its newest half, as
in `infer`), and ids are drawn by mpitrain/sampler.py at temperature 0.8 from a generator
seeded by (seed, step), so a sample depends only on the parameters and the step, never on
timing or on how many samples came before.
"""
import numpy as np

PROMPT_TOKENS = 8       # the prompt: the first tokens of the validation split (fixed per dataset)
NEW_TOKENS = 32         # tokens generated per sample
TEMPERATURE = 0.8


def sample_prompt(val_tokens: np.ndarray, eod_id: int) -> np.ndarray:
    """The fixed prompt: the validation split's first PROMPT_TOKENS tokens, up to an
    end-of-document id. int32 [<= PROMPT_TOKENS], at least one token."""
    head = np.asarray(val_tokens[:PROMPT_TOKENS], np.int64)
    ends = np.flatnonzero(head == eod_id)
    if ends.size:
        head = head[:ends[0]]
    return (head if head.size else np.array([eod_id])).astype(np.int32)


def generate(model, prompt: np.ndarray, seed: int, step: int, context: int,
             new_tokens: int = NEW_TOKENS, temperature: float = TEMPERATURE) -> np.ndarray:
    """Continue `prompt` (int32 [P]) by `new_tokens` ids (int32 [new_tokens]; none when the
    parameters are not finite: there is no distribution to draw from)."""
    if not np.isfinite(model.param_buffer).all():
        return np.zeros(0, np.int32)
    from mpitrain.generate import Decoder
    from mpitrain.sampler import Sampler

    decoder = Decoder(model, context=min(context, model.config.max_seq_len))
    sampler = Sampler(temperature, seed=(seed, step))
    out = [t for made in decoder.generate_batch([prompt], new_tokens, [sampler]) for _, t in made]
    return np.array(out, np.int32)
