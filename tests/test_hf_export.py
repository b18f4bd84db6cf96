"""`mpitrain export --format hf` (mpitrain/hf_export.py): the folder Hugging Face transformers
loads gives mpitrain's logits, ids and greedy continuations. Models are made here (a scaled
random model saved as a checkpoint, and a tiny model trained through the command line);
nothing comes from a hub. Tests that need transformers, torch, tokenizers or safetensors skip
without them; the refusals run everywhere."""
import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import CORPUS_FILES, assert_user_error, write_corpus
from mpitrain import Model, ModelConfig, cli
from mpitrain.checkpoint import find_resume
from mpitrain.errors import UserError
from mpitrain.tokenizer import PATTERN, Tokenizer
from test_generate_support import save_model, scaled_model

# Unicode-heavy text: CJK, emoji (with ZWJ and skin tone), combining marks, connector
# punctuation, other numbers, control characters, CRLF, NEL, line/paragraph separators, the
# special token's literal text.
HARD = [
    *CORPUS_FILES.values(),
    "日本語 日本 本 中文。、「引用」 한국어 ภาษาไทย हिन्दी العربية",
    "😀 👩\u200d👩\u200d👧 👍🏽 🇯🇵 é e\u0301 éx x\u0301\u0302 a\u20dd ‿tie_fighter‿ ²³½ Ⅻ ٣٤",
    "\x00\x01\x1c\x1d\x1e\x1f\x7f\x85 \u2028\u2029\u00a0\u3000 tabs\t\tand\r\n\r\nCRLF\r",
    "<|endoftext|><|endoftext|> <|endoftext|>x <|endo ftext|>",
    "snake_case __dunder__ 1_000_000 x1 1x ß ǅ ﬁ İı K Å",
]
# Single multi-byte characters in the vocabulary: they must not be found inside a longer
# pre-token (mpitrain writes such a pre-token as bytes).
SINGLES = ["é", "日", "本", "😀", "。", "\u0301", "²", "‿"]


def _tokenizer():
    counts = Counter(t for text in HARD for t in re.findall(PATTERN, text))
    tok = Tokenizer.from_counts(counts, vocab_size=10_000)
    return Tokenizer(tok.pretokens + [s for s in SINGLES if s not in tok.pretokens])


TOK = _tokenizer()
CONFIG = ModelConfig(vocab_size=TOK.vocab_size, max_seq_len=24, d_model=32, n_layers=2,
                     n_heads=4, d_ff=80)


def _hf():
    """transformers and torch, or skip."""
    for name in ("torch", "tokenizers", "safetensors"):
        pytest.importorskip(name)
    return pytest.importorskip("transformers"), pytest.importorskip("torch")


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """(checkpoint path, export dir) of a scaled random model with the Unicode vocabulary."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("scaled")
    ckpt = save_model(root / "checkpoint_step_3.h5", scaled_model(CONFIG, seed=4, scale=8.0),
                      tokenizer=TOK)
    assert cli.main(["export", ckpt, "--format", "hf", "--out", str(root / "hf")]) == 0
    return ckpt, str(root / "hf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint path, export dir) of a tiny model trained 20 steps through the command line."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from conftest import run_cli

    root = tmp_path_factory.mktemp("trained")
    write_corpus(root / "corpus")
    for args in (["prepare", "--data", root / "corpus", "--out", root / "d.h5",
                  "--vocab-size", 320, "--seq-len", 16, "--quiet"],
                 ["train", "--dataset", root / "d.h5", "--preset", "tiny", "--epochs", 12,
                  "--max-steps", 20, "--save-every", 20, "--threads", 2, "--run-dir",
                  root / "run", "--quiet"]):
        proc = run_cli(*args, timeout=300)
        assert proc.returncode == 0, proc.stderr
    ckpt = str(find_resume(root / "run"))      # the newest checkpoint
    assert not ckpt.endswith("_0.h5")
    proc = run_cli("export", ckpt, "--format", "hf", "--out", root / "hf")
    assert proc.returncode == 0, proc.stderr
    return ckpt, str(root / "hf")


# ---- the folder ---------------------------------------------------------------------------------

def test_folder_contents(scaled):
    ckpt, out = scaled
    assert sorted(os.listdir(out)) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"],
            cfg["n_head"], cfg["n_inner"]) == (TOK.vocab_size, 24, 32, 2, 4, 80)
    assert (cfg["activation_function"], cfg["layer_norm_epsilon"],
            cfg["tie_word_embeddings"]) == ("gelu_new", 1e-5, False)
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == TOK.eod_id
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(out, "model.safetensors"))
    model = Model.from_checkpoint(ckpt)
    assert sorted(tensors) == sorted(model.param_names)   # lm_head.weight included
    for name in model.param_names:
        want = model.params[name]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            want = want.T
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], want, err_msg=name)
    card = open(os.path.join(out, "README.md")).read()
    assert "steps: 3" in card and "5.0000" in card and "5.5000" in card
    assert "command line: not recorded in the checkpoint" in card
    assert "data: not recorded in the checkpoint" in card
    assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]


# ---- logits -------------------------------------------------------------------------------------

# Both sides compute in float32 with different summation orders; measured worst difference
# is below 2e-6 on these logits (|logit| up to ~30 for the scaled model); 1e-4 leaves margin
# for other BLAS kernels.
LOGIT_TOL = 1e-4


@pytest.mark.parametrize("which", ["scaled", "trained"])
def test_logits_match(which, request):
    transformers, torch = _hf()
    ckpt, out = request.getfixturevalue(which)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf.eval()
    ours = Model.from_checkpoint(ckpt)
    tok = ours.checkpoint.tokenizer
    T = ours.config.max_seq_len
    rng = np.random.default_rng(0)
    prompts = [tok.encode(t)[:T] for t in HARD] + [rng.integers(0, tok.vocab_size, T)]
    for ids in prompts:
        ids = np.asarray(ids, np.int64)[None]
        want = ours.forward(ids)
        with torch.no_grad():
            got = hf(torch.from_numpy(ids)).logits.numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_TOL)


# ---- tokenizer ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _hf_tokenizer(out):
    transformers, _ = _hf()
    return transformers.AutoTokenizer.from_pretrained(out)


def test_tokenizer_matches_on_unicode_corpus(scaled):
    hf = _hf_tokenizer(scaled[1])
    for text in HARD + ["".join(HARD), "éx", "日本", "e\u0301", "‿‿", "²x"]:
        want = TOK.encode(text).tolist()
        assert hf.encode(text) == want, text
        assert hf.decode(want) == TOK.decode(want) == text
    assert hf.encode("<|endoftext|>") != [TOK.eod_id]
    assert hf.decode([TOK.eod_id]) == "<|endoftext|>"
    assert hf.eos_token_id == hf.bos_token_id == TOK.eod_id


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
@example(text="e\u0301x\x1c‿²")
def test_tokenizer_matches_on_arbitrary_unicode(scaled, text):
    hf = _hf_tokenizer(scaled[1])
    assert hf.encode(text) == TOK.encode(text).tolist()


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, TOK.vocab_size - 1), max_size=30))
def test_decode_matches_on_any_ids(scaled, ids):
    """Byte ids that do not form UTF-8 become U+FFFD the same way on both sides."""
    assert _hf_tokenizer(scaled[1]).decode(ids) == TOK.decode(ids)


# ---- the pre-token expression in Oniguruma ------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _split(pattern):
    tokenizers = pytest.importorskip("tokenizers")
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated")
    return lambda text: [piece for piece, _ in split.pre_tokenize_str(text)]


def test_raw_pattern_differs_in_oniguruma():
    """Why the classes are spelled out: Oniguruma's \\w holds combining marks and connector
    punctuation, its \\s lacks U+001C..U+001F."""
    raw = _split(PATTERN)
    for text in ("e\u0301", "a‿b", "\x1c\x1d!"):
        assert raw(text) != re.findall(PATTERN, text), text


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=80) | st.text(st.characters(categories=(
    "Mn", "Mc", "Me", "Pc", "Nl", "No", "Nd", "Zs", "Zl", "Zp", "Cc", "Lm", "Lo", "So")),
    max_size=40))
def test_exported_pattern_agrees_with_python(text):
    from mpitrain.hf_export import onig_pattern

    assert _split(onig_pattern(PATTERN))(text) == re.findall(PATTERN, text)


def test_exported_pattern_agrees_at_every_class_boundary():
    """The code points at both ends of every range of every class, their outside neighbours
    and every 61st code point, each between separators of each class: both engines cut the
    same. (All 1.1M code points would take Oniguruma a minute.)"""
    from mpitrain.hf_export import _runs, onig_pattern

    points = set(range(0, 0x110000, 61))
    for cls in (r"\w", r"\s", r"\d", r"[^\W\d_]"):
        for a, b in _runs(cls):
            points.update((a - 1, a, b, b + 1))
    chars = [chr(c) for c in sorted(points) if 0 <= c < 0x110000 and not 0xD800 <= c < 0xE000]
    split = _split(onig_pattern(PATTERN))
    for sep in (" ", "a", "1", "_", "!", "\n"):
        text = sep.join(chars)
        assert split(text) == re.findall(PATTERN, text), repr(sep)


# ---- greedy generation --------------------------------------------------------------------------

MARGIN = 1e-4   # below this top-2 logit margin the argmax may flip within LOGIT_TOL


@pytest.mark.parametrize("which,prompt", [("scaled", "The quick 日本"), ("trained", "the fox")])
def test_greedy_generation_matches_infer(which, prompt, request, capsys):
    from conftest import run_cli
    from mpitrain.generate import Decoder

    transformers, torch = _hf()
    ckpt, out = request.getfixturevalue(which)
    gen = Decoder.from_file(ckpt)
    ids = gen.tokenizer.encode(prompt)
    n_new = gen.max_context - ids.size          # no context slide: GPT-2 stops at n_positions
    ours, margins = [], []
    logits = gen.feed(ids)
    for _ in range(n_new):
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ours.append(int(np.argmax(logits)))
        if ours[-1] == gen.tokenizer.eod_id:
            break
        logits = gen.feed([ours[-1]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = hf.generate(torch.tensor([ids.tolist()]), max_new_tokens=n_new, do_sample=False,
                          attention_mask=torch.ones(1, ids.size, dtype=torch.long))
    theirs = got[0, ids.size:].tolist()
    close = [k for k, m in enumerate(margins) if m < MARGIN]
    upto = close[0] if close else len(ours)   # tokens before the first near-tie
    with capsys.disabled():
        print(f"\n{which}: {len(ours)} greedy tokens, first top-2 margin below {MARGIN:g} at "
              f"{'step ' + str(close[0]) if close else 'no step'}; compared {upto}")
    assert upto >= 5, margins
    assert theirs[:upto] == ours[:upto]
    # mpitrain infer --temperature 0 writes the same continuation (it stops at end of document)
    proc = run_cli("infer", "--model", ckpt, "--prompt", prompt, "--temperature", 0,
                   "--max-new-tokens", n_new)
    assert proc.returncode == 0, proc.stderr
    text = gen.tokenizer.decode([t for t in ours if t != gen.tokenizer.eod_id])
    assert proc.stdout == (text + "\n").replace("\r\n", "\n").replace("\r", "\n")  # text mode


# ---- Model.from_checkpoint ----------------------------------------------------------------------

def test_model_from_checkpoint_and_export(tmp_path):
    model = scaled_model(CONFIG, seed=2, threads=2)   # same split as the loaded model's
    ckpt = save_model(tmp_path / "c.h5", model, tokenizer=TOK)
    assert cli.main(["export", ckpt, "--out", str(tmp_path / "w.h5")]) == 0
    ids = TOK.encode("the quick 日本語")[None]
    for path in (ckpt, tmp_path / "w.h5"):
        loaded = Model.from_checkpoint(path, threads=2)
        assert loaded.threads == 2 and loaded.config == CONFIG
        assert loaded.checkpoint.step == 3 and loaded.checkpoint.params is None
        assert loaded.checkpoint.tokenizer.vocab_size == TOK.vocab_size
        assert loaded.param_buffer.tobytes() == model.param_buffer.tobytes()
        np.testing.assert_array_equal(loaded.forward(ids), model.forward(ids))
    with pytest.raises(UserError, match="no such file"):
        Model.from_checkpoint(tmp_path / "missing.h5")


# ---- refusals -----------------------------------------------------------------------------------

def _export(capsys, *args):
    code = cli.main(["export", *map(str, args), "--format", "hf"])
    err = capsys.readouterr().err
    return code, err


def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys):
    ckpt = save_model(tmp_path / "c.h5", scaled_model(CONFIG), tokenizer=TOK)
    for name in ("safetensors", "safetensors.numpy", "tokenizers"):
        monkeypatch.setitem(__import__("sys").modules, name, None)   # import fails
    code, err = _export(capsys, ckpt, "--out", tmp_path / "hf")
    assert code == 2 and err.count("\n") == 1 and "pip install 'mpitrain[hf]'" in err
    assert not (tmp_path / "hf").exists()


def test_existing_directory_and_damaged_checkpoint(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from test_checkpoint import _flip_byte_in

    ckpt = save_model(tmp_path / "c.h5", scaled_model(CONFIG), tokenizer=TOK)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, err = _export(capsys, ckpt, "--out", full)
    assert code == 2 and err.count("\n") == 1 and "exists and is not empty" in err
    assert os.listdir(full) == ["keep.txt"]
    code, err = _export(capsys, ckpt, "--out", tmp_path / "c.h5")
    assert code == 2 and "not a directory" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(capsys, ckpt, "--out", empty)[0] == 0 and "config.json" in os.listdir(empty)
    _flip_byte_in(ckpt, "params/lm_head.weight")
    code, err = _export(capsys, ckpt, "--out", tmp_path / "new")
    assert code == 2 and err.count("\n") == 1 and "fails its checksum" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "empty", "full"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    pytest.importorskip("safetensors")
    from mpitrain import hf_export

    ckpt = save_model(tmp_path / "c.h5", scaled_model(CONFIG), tokenizer=TOK)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(hf_export, "model_card", boom)
    with pytest.raises(OSError, match="disk full"):
        hf_export.export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]


def test_command_line_errors_are_one_line(tmp_path, cli):
    proc = cli("export", tmp_path / "none.h5", "--format", "hf", "--out", tmp_path / "hf")
    if "pip install" in proc.stderr:
        assert_user_error(proc, "mpitrain[hf]")
    else:
        assert_user_error(proc, "no such file")


def test_options_gpt2_cannot_represent_are_refused_by_name(monkeypatch):
    from dataclasses import field, fields

    from mpitrain import hf_export

    @dataclass(frozen=True)
    class Future(ModelConfig):
        position: str = field(default="learned", metadata={"choices": ("learned", "rotary")})

    assert hf_export.refused_options(Future()) == []
    assert hf_export.refused_options(Future(position="rotary")) == ["position='rotary'"]
    with pytest.raises(UserError, match=r"cannot represent position='rotary'"):
        hf_export.gpt2_config(Future(position="rotary"), 0)
    monkeypatch.setitem(hf_export.GPT2_ACCEPTS, "position", ("rotary",))
    assert hf_export.refused_options(Future(position="rotary")) == []
    # every field of ModelConfig is carried by a GPT-2 key or is an option (stored only when
    # set) that is refused when changed
    assert {f.name for f in fields(ModelConfig)
            if not f.metadata.get("optional")} <= set(hf_export.GPT2_KEYS)
    # parameters GPT-2 would not load (it only warns) are refused too
    params = {n: np.zeros(s, np.float32) for n, s in Model(CONFIG).param_shapes.items()}
    assert list(hf_export.gpt2_tensors(params, CONFIG)) == list(params)
    params["lm_head.bias"] = np.zeros(CONFIG.vocab_size, np.float32)
    with pytest.raises(UserError, match="differ from GPT-2's .lm_head.bias"):
        hf_export.gpt2_tensors(params, CONFIG)
