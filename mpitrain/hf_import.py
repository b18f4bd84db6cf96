"""Reading back a Hugging Face folder written by `export --format hf` (mpitrain/hf_export.py),
so that `infer` and `serve` take the folder as they take the checkpoint it came from, with
bitwise the same weights and the same vocabulary.

Only what the export writes is accepted: a GPT2LMHeadModel configuration whose fixed settings
are the export's (GPT2_FIXED: the same function), exactly GPT-2's tensors in float32 with the
shapes the configuration implies (Conv1D weights transposed back to [out, in]), and a
tokenizer.json whose pre-token expression is the one the export writes for mpitrain's pattern
and whose vocabulary, mapped back from GPT-2's byte alphabet, is specials, the 256 bytes and
the pre-tokens in mpitrain's order. Anything else is a UserError naming the file and what is
wrong. Weights are read with the `safetensors` package (the `hf` extra).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpitrain.errors import UserError
from mpitrain.hf_export import (CONV1D, GPT2_FIXED, GPT2_KEYS, INSTALL_HINT, byte_chars,
                                gpt2_names, onig_pattern)

FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass
class HFFolder:
    """What Decoder.from_file keeps of a folder (the fields the server reports)."""
    path: str
    model_config: object
    tokenizer: object
    format: str = "hf"
    step: int = None
    created_by: dict = field(default_factory=dict)


def is_hf_folder(path) -> bool:
    return Path(path).is_dir()


def _json(folder, name):
    p = Path(folder) / name
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} has no {name}: give a checkpoint, a weights-only export or "
                        "a folder written by export --format hf") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"cannot read {p}: {getattr(e, 'strerror', None) or e}") from None


def model_config(folder):
    """The ModelConfig of the folder's config.json (UserError unless the export wrote it)."""
    from mpitrain.config import ModelConfig

    cfg = _json(folder, "config.json")
    where = Path(folder) / "config.json"
    if cfg.get("model_type") != "gpt2" or cfg.get("architectures") != ["GPT2LMHeadModel"]:
        raise UserError(f"{where}: not a GPT2LMHeadModel configuration")
    for key, want in GPT2_FIXED.items():
        if cfg.get(key) != want:
            raise UserError(f"{where}: {key} is {cfg.get(key)!r}; mpitrain's model has {want!r}")
    try:
        return ModelConfig.from_dict({name: cfg[key] for name, key in GPT2_KEYS.items()})
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def read_weights(folder, config, into):
    """Copy the folder's tensors into `into` (name -> float32 array of mpitrain's shapes)."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        _json(folder, "model.safetensors")   # names the missing file
    want = gpt2_names(config)
    try:
        with safe_open(str(path), framework="numpy") as f:
            have = sorted(f.keys())
            if have != sorted(want):
                odd = sorted(set(have) ^ set(want))
                raise UserError(f"{path}: the tensors differ from the model's "
                                f"({', '.join(odd[:5])})")
            for name in want:
                arr = f.get_tensor(name)
                if arr.dtype != np.float32:
                    raise UserError(f"{path}: {name} is {arr.dtype}, not float32")
                if name.endswith(CONV1D):
                    arr = arr.T
                if arr.shape != into[name].shape:
                    raise UserError(f"{path}: {name} has shape {arr.shape}, the configuration "
                                    f"gives {into[name].shape}")
                into[name][...] = arr
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def read_tokenizer(folder):
    """mpitrain's Tokenizer from the folder's tokenizer.json."""
    from mpitrain.tokenizer import PATTERN, Tokenizer

    where = Path(folder) / "tokenizer.json"
    tj = _json(folder, "tokenizer.json")
    try:
        split = tj["pre_tokenizer"]["pretokenizers"][0]
        vocab = tj["model"]["vocab"]
        specials = [t["content"] for t in sorted(tj["added_tokens"], key=lambda t: t["id"])
                    if t.get("special")]
        regex = split["pattern"]["Regex"]
    except (KeyError, IndexError, TypeError):
        raise UserError(f"{where}: not a tokenizer written by export --format hf") from None
    if regex != onig_pattern(PATTERN):
        raise UserError(f"{where}: its pre-token expression is not the one export --format hf "
                        "writes")
    byte_of = {c: b for b, c in enumerate(byte_chars())}
    tokens = [None] * len(vocab)
    try:
        for key, i in vocab.items():
            tokens[i] = key.encode() if i < len(specials) else bytes(byte_of[c] for c in key)
        if None in tokens:
            raise ValueError(f"id {tokens.index(None)} has no token")
        return Tokenizer._from_token_bytes(tokens, tuple(specials), PATTERN, str(where))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise UserError(f"{where}: the vocabulary is not mpitrain's ({e})") from None
