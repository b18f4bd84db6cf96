"""The text sample Node Zero shows at each evaluation.

A plain loop over Model.forward: the whole context goes through the model for every new token
(no KV cache), so the context is cut to the last `context` tokens. Sampling draws from
softmax(logits / temperature) with a generator seeded by (seed, step), so a sample depends only
on the parameters and the step, never on timing or on how many samples came before.
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
    """Continue `prompt` (int32 [P]) by `new_tokens` ids (int32 [new_tokens]; fewer, possibly
    none, when the logits are not finite)."""
    rng = np.random.default_rng((seed, step))
    ids = list(int(t) for t in prompt)
    out = []
    for _ in range(new_tokens):
        x = np.array(ids[-context:], np.int32)[None, :]                  # [1, T]
        logits = np.asarray(model.forward(x, last_only=True)[0], np.float64)   # [V]
        if temperature <= 0:
            nxt = int(np.argmax(logits))
        elif not np.isfinite(logits).all():
            break   # parameters gone NaN or Inf: no distribution to draw from; the sample ends
        else:
            z = (logits - logits.max()) / temperature
            p = np.exp(z)
            nxt = int(rng.choice(p.size, p=p / p.sum()))
        ids.append(nxt)
        out.append(nxt)
    return np.array(out, np.int32)
