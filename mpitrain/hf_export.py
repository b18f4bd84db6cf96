"""A checkpoint as a Hugging Face model folder: GPT-2 weights, configuration and tokenizer.

`mpitrain export CKPT --format hf --out DIR` writes (docs/FORMATS.md, "Hugging Face export"):
  config.json              GPT-2 configuration (GPT2LMHeadModel)
  model.safetensors        the parameters under their own names (they are GPT-2's), the four
                           linear weights of each block transposed to Conv1D's [in, out]
  tokenizer.json           the vocabulary as a `tokenizers` BPE model without merges
  tokenizer_config.json, special_tokens_map.json, generation_config.json
  README.md                a model card from the checkpoint's attributes
so that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)` give the same logits and the same ids as mpitrain.

The tokenizer. mpitrain cuts text into pre-tokens (mpitrain/tokenizer.py, PATTERN); a pre-token
in the vocabulary is one id, any other is the ids of its UTF-8 bytes. In `tokenizers` terms:
a Split pre-tokenizer (isolated matches) followed by the byte-level mapping (every byte to one
printable character, GPT-2's table), and a BPE model whose vocabulary is every token's bytes
in that mapping, with no merges and ignore_merges: a whole pre-token found in the vocabulary
is its id, otherwise each of its bytes (one mapped character each) is. Byte fallback over
characters would not do: a multi-byte character that is itself in the vocabulary (say "é")
would be found inside a longer pre-token ("éx") that mpitrain writes as bytes.
The special token is an added token that text never produces (split_special_tokens), as in
mpitrain, where specials are never looked up from text.

The pre-token expression uses \\w, \\d and \\s, which Python's `re` and Oniguruma (the engine of
`tokenizers`) define differently (combining marks and connector punctuation are \\w for
Oniguruma, not for Python; U+001C..U+001F are \\s for Python only; ...). The exported pattern
spells every class out as code point ranges taken from Python's `re`, so both engines cut
text the same way (checked over arbitrary Unicode in tests/test_hf_export.py).
"""
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import unicodedata
from dataclasses import fields
from pathlib import Path

import numpy as np

from mpitrain.errors import UserError

INSTALL_HINT = ("the Hugging Face export needs the optional packages safetensors and "
                "tokenizers: pip install 'mpitrain[hf]'")

# ModelConfig fields and the GPT-2 configuration keys that carry them.
GPT2_KEYS = {"vocab_size": "vocab_size", "max_seq_len": "n_positions", "d_model": "n_embd",
             "n_layers": "n_layer", "n_heads": "n_head", "d_ff": "n_inner"}
# Any other ModelConfig field must hold its default (a new field's default means today's
# architecture, which GPT-2's code computes) or a value listed here; otherwise the export is
# refused by name. So a future `position` field is refused at "rotary" with no line here, and
# a non-default value GPT-2 can represent is one line, e.g. "position": ("learned",) for a field
# whose default were another.
GPT2_ACCEPTS = {}

# The architecture (docs/FORMATS.md): GELU in its tanh form, LayerNorm eps 1e-5, no dropout,
# an untied output head. These settings make GPT-2's code compute the same function.
GPT2_FIXED = {
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": 0.02,
    "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False, "tie_word_embeddings": False, "use_cache": True,
}
# Linear weights stored [out, in] here that GPT-2's Conv1D keeps [in, out].
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _require_extra():
    """(safetensors.numpy.save_file, tokenizers) or UserError with the install line."""
    try:
        import tokenizers
        from safetensors.numpy import save_file
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return save_file, tokenizers


# ----------------------------------------------------------------------------- model

def refused_options(config) -> list:
    """'field=value' for every ModelConfig setting GPT-2's code cannot represent."""
    out = []
    for f in fields(config):
        if f.name in GPT2_KEYS or f.name in config.inert_fields():
            continue
        value = getattr(config, f.name)
        if value != f.default and value not in GPT2_ACCEPTS.get(f.name, ()):
            out.append(f"{f.name}={value!r}")
    return out


def gpt2_config(model_config, eod_id) -> dict:
    refused = refused_options(model_config)
    if refused:
        raise UserError(f"the GPT-2 code of Hugging Face transformers cannot represent "
                        f"{', '.join(refused)}; export --format h5 instead")
    cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    cfg.update({key: getattr(model_config, name) for name, key in GPT2_KEYS.items()})
    cfg.update(GPT2_FIXED)
    cfg.update(bos_token_id=eod_id, eos_token_id=eod_id, dtype="float32")
    return cfg


def gpt2_names(config) -> list:
    """The tensors GPT2LMHeadModel of `config` loads (tie_word_embeddings false)."""
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    return (["transformer.wte.weight", "transformer.wpe.weight"]
            + [f"transformer.h.{i}.{n}" for i in range(config.n_layers) for n in block]
            + ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"])


def gpt2_tensors(params, config) -> dict:
    """name -> float32 C-contiguous array as GPT2LMHeadModel's state_dict holds it; UserError
    when the parameters are not exactly the ones GPT-2 loads (transformers would only warn)."""
    want = gpt2_names(config)
    if sorted(params) != sorted(want):
        odd = sorted(set(params) ^ set(want))
        raise UserError(f"the parameters differ from GPT-2's ({', '.join(odd[:5])}); "
                        "export --format h5 instead")
    out = {}
    for name, arr in params.items():
        arr = np.asarray(arr, dtype=np.float32)
        if name.endswith(CONV1D):
            arr = arr.T
        out[name] = np.ascontiguousarray(arr)
    return out


# ----------------------------------------------------------------------------- tokenizer

def byte_chars() -> list:
    """GPT-2's byte-level alphabet: byte b -> one printable character (the same table as
    `tokenizers.pre_tokenizers.ByteLevel`)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@functools.lru_cache(maxsize=1)
def _all_code_points() -> str:
    """Every code point in order, the surrogates (which no valid text holds) replaced by NUL:
    character i of the string is code point i."""
    cps = np.arange(0x110000, dtype="<u4")
    cps[0xD800:0xE000] = 0
    return cps.tobytes().decode("utf-32-le")


def _runs(cls: str) -> list:
    """[(first, last)] code point ranges that Python's `re` class `cls` matches."""
    if re.fullmatch(cls, "\0"):
        raise ValueError(f"class {cls} matches NUL, the surrogates' stand-in")
    return [(m.start(), m.end() - 1) for m in re.finditer(f"{cls}+", _all_code_points())]


def _onig_class(runs, negate=False) -> str:
    def cp(c):
        return f"\\x{{{c:X}}}"
    body = "".join(cp(a) if a == b else f"{cp(a)}-{cp(b)}" for a, b in runs)
    return f"[{'^' if negate else ''}{body}]"


def _merge(*run_lists):
    out = []
    for a, b in sorted(r for runs in run_lists for r in runs):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@functools.lru_cache(maxsize=4)
def onig_pattern(pattern: str) -> str:
    """`pattern` (mpitrain.tokenizer.PATTERN) with its classes spelled out as code point
    ranges, so Oniguruma cuts text exactly as Python's `re` does. UserError for a vocabulary
    whose stored pattern is another one (it has no known translation)."""
    from mpitrain.tokenizer import PATTERN

    if pattern != PATTERN:
        raise UserError(f"the vocabulary's pre-token pattern {pattern!r} is not the one this "
                        f"mpitrain translates for Hugging Face tokenizers ({PATTERN!r})")
    word, space = _runs(r"\w"), _runs(r"\s")
    letters, digits = _onig_class(_runs(r"[^\W\d_]")), _onig_class(_runs(r"\d"))
    other = _onig_class(_merge(word, space), negate=True)   # [^\s\w]
    return f" ?{letters}+| ?{digits}+| ?{other}+| ?_+|{_onig_class(space)}+"


def build_tokenizer(tok):
    """A `tokenizers.Tokenizer` that encodes (and decodes) exactly as `tok` does."""
    _, tokenizers = _require_extra()
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    chars = byte_chars()
    vocab = {}
    for i in range(tok.vocab_size):
        key = tok.specials[i] if i < tok.num_specials else \
            "".join(chars[b] for b in tok.token_bytes(i))
        if vocab.setdefault(key, i) != i:
            raise UserError(f"token {i} ({tok.token_str(i)!r}) spells the same as token "
                            f"{vocab[key]}: the vocabulary cannot be exported")
    model = models.BPE(vocab=vocab, merges=[], ignore_merges=True)
    ht = tokenizers.Tokenizer(model)
    ht.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(tok.pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    ht.decoder = decoders.ByteLevel()
    ht.add_special_tokens([AddedToken(s, special=True, normalized=False)
                           for s in tok.specials])
    ht.encode_special_tokens = True   # text never becomes a special token
    return ht


def tokenizer_files(tok, model_config) -> dict:
    """file name -> JSON-ready dict for tokenizer_config.json and special_tokens_map.json."""
    eod = tok.specials[tok.eod_id]
    special = {"bos_token": eod, "eos_token": eod}
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "model_max_length": model_config.max_seq_len, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "add_prefix_space": False,
              "add_bos_token": False, "add_eos_token": False, **special}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


# ----------------------------------------------------------------------------- model card

def _fmt_loss(x):
    return "not recorded" if x is None else f"{x:.4f}"


def model_card(ck, source) -> str:
    mc, tc, extra = ck.model_config, ck.train_config, ck.extra or {}
    total = extra.get("total_steps")
    steps = f"{ck.step:,}" + (f" of {total:,} planned" if isinstance(total, int) else "")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation",
        "tags: [gpt2, mpitrain]", "---", "",
        f"# {Path(source).stem}", "",
        "A small GPT trained with mpitrain and exported with `mpitrain export --format hf`. "
        "It loads as `GPT2LMHeadModel` with its tokenizer; the end-of-document token "
        f"`{ck.tokenizer.specials[ck.tokenizer.eod_id]}` (id {ck.tokenizer.eod_id}) separates "
        "documents and ends generation.", "",
        "## Model", "",
        f"- {mc.n_layers} layers, width {mc.d_model}, {mc.n_heads} heads, MLP width {mc.d_ff}, "
        f"context {mc.max_seq_len} tokens, vocabulary {mc.vocab_size} "
        f"({sum(int(np.prod(a.shape)) for a in ck.params.values()):,} parameters)",
        "- GELU (tanh form), LayerNorm eps 1e-5, learned positions, untied output head", "",
        "## Training", "",
        f"- steps: {steps} (epoch {ck.epoch})",
        f"- training loss at the last step: {_fmt_loss(ck.train_loss)}",
        f"- validation loss at the last evaluation: {_fmt_loss(ck.val_loss)}",
        f"- best validation loss: {_fmt_loss(extra.get('best_val_loss'))}",
        f"- settings: sequence length {tc.seq_len}, batch {tc.batch_size} windows, peak "
        f"learning rate {tc.lr:g}, warmup {tc.warmup} steps, weight decay {tc.weight_decay:g}, "
        f"gradient clip {tc.clip:g}, seed {tc.seed}",
    ]
    for key, what in (("command", "command line"), ("dataset", "data")):
        value = extra.get(key)
        lines.append(f"- {what}: " + (f"`{json.dumps(value)}`" if value is not None else
                                      f"not recorded in the checkpoint"))
    who = ck.created_by or {}
    lines += ["", "## Provenance", "",
              f"- exported from `{os.path.basename(source)}`, written by {who.get('program', '?')} "
              f"{who.get('version', '?')} at {who.get('time_utc', '?')}",
              f"- pre-token classes spelled out from Unicode {unicodedata.unidata_version} "
              f"(Python {sys.version.split()[0]})", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing

def _check_target(out: Path):
    if out.is_dir():
        if any(out.iterdir()):
            raise UserError(f"{out} exists and is not empty; choose a new directory for the "
                            "Hugging Face export")
    elif out.exists():
        raise UserError(f"{out} exists and is not a directory")
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_hf(src, out) -> Path:
    """Write the Hugging Face folder `out` from the checkpoint or export `src`: into a
    temporary folder created exclusively beside `out`, then renamed into place (an empty
    `out` is replaced; a non-empty one is refused)."""
    from mpitrain.checkpoint import load_checkpoint

    save_file, _ = _require_extra()
    out = Path(os.path.abspath(out))
    _check_target(out)
    ck = load_checkpoint(src, load_optimizer=False)
    bad = [n for n, a in ck.params.items() if not np.isfinite(a).all()]
    if bad:
        raise UserError(f"{src}: the weights contain NaN or Inf (first in {bad[0]}); the run "
                        "that wrote them diverged")
    config = gpt2_config(ck.model_config, ck.tokenizer.eod_id)
    tensors = gpt2_tensors(ck.params, ck.model_config)
    tokenizer = build_tokenizer(ck.tokenizer)
    eod = ck.tokenizer.eod_id
    jsons = {"config.json": config,
             # max_length: GPT-2's learned positions end there (generating past them fails)
             "generation_config.json": {"bos_token_id": eod, "eos_token_id": eod,
                                        "pad_token_id": eod, "do_sample": False,
                                        "max_length": ck.model_config.max_seq_len},
             **tokenizer_files(ck.tokenizer, ck.model_config)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, data in jsons.items():
            (tmp / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(ck, src), encoding="utf-8")
        mask = _umask()
        for p in tmp.iterdir():   # mkdtemp and safetensors make private modes
            os.chmod(p, 0o666 & ~mask)
            _fsync(p)
        os.chmod(tmp, 0o777 & ~mask)
        try:
            os.rename(tmp, out)   # replaces an empty directory only
        except OSError as e:
            raise UserError(f"cannot move the export into {out} ({e.strerror}); it must be a "
                            "new or empty directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(out.parent, directory=True)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
