"""The text sample Node Zero shows at each evaluation.

The prompt (TrainConfig.sample_prompt, by default the validation split's first tokens) goes
through the kernel's cached decoding (mpitrain/generate.py, one sequence) with the context
limited to the training's seq_len (beyond it the context keeps its newest half, as in
`infer`), and TrainConfig.sample_tokens ids are drawn by mpitrain/sampler.py at
TrainConfig.sample_temperature from a generator seeded by (seed, step), so a sample depends
only on the parameters and the step, never on timing or on how many samples came before.
"""
import numpy as np

from mpitrain.config import TrainConfig

PROMPT_TOKENS = 8       # the default prompt: the first tokens of the validation split
NEW_TOKENS = TrainConfig.sample_tokens           # the defaults, for callers that give none
TEMPERATURE = TrainConfig.sample_temperature


def sample_prompt(val_tokens: np.ndarray, eod_id: int, text: str = "",
                  tokenizer=None) -> np.ndarray:
    """The prompt: `text` encoded when given (its last seq_len tokens are kept by the
    decoder), else the validation split's first PROMPT_TOKENS tokens, up to an end-of-document
    id. int32, at least one token."""
    if text:
        ids = np.asarray(tokenizer.encode(text), np.int64)
        return (ids if ids.size else np.array([eod_id])).astype(np.int32)
    head = np.asarray(val_tokens[:PROMPT_TOKENS], np.int64)
    ends = np.flatnonzero(head == eod_id)
    if ends.size:
        head = head[:ends[0]]
    return (head if head.size else np.array([eod_id])).astype(np.int32)


def generate(model, prompt: np.ndarray, seed: int, step: int, context: int,
             new_tokens: int = NEW_TOKENS, temperature: float = TEMPERATURE) -> np.ndarray:
    """Continue `prompt` (int32 [P]) by `new_tokens` ids (int32 [new_tokens]; none when the
    parameters are not finite: there is no distribution to draw from)."""
    if new_tokens == 0 or not np.isfinite(model.param_buffer).all():
        return np.zeros(0, np.int32)
    from mpitrain.generate import Decoder
    from mpitrain.sampler import Sampler

    decoder = Decoder(model, context=min(context, model.config.max_seq_len))
    prompt = prompt[-decoder.max_context:]   # a long sample_prompt: its newest tokens
    sampler = Sampler(temperature, seed=(seed, step))
    out = [t for made in decoder.generate_batch([prompt], new_tokens, [sampler]) for _, t in made]
    return np.array(out, np.int32)
