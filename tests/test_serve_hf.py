"""`serve` and `infer` take a folder written by `export --format hf` (mpitrain/hf_import.py):
the folder gives bitwise the checkpoint's weights and the same vocabulary, so the greedy
completions served from the folder are the ones served from the checkpoint (and the ones
`infer` prints from either); a folder the export did not write is refused in one line."""
import json
import shutil

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from mpitrain import cli
from mpitrain.generate import Decoder
from test_generate_support import TOKENIZER, save_model, scaled_model

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

PROMPTS = [" the quick brown fox", " over the lazy dog and", "we you"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_hf")
    ckpt = save_model(root / "model.h5", scaled_model(seed=6))
    assert cli.main(["export", ckpt, "--format", "hf", "--out", str(root / "hf")]) == 0
    return ckpt, str(root / "hf")


def test_folder_loads_the_checkpoints_weights_and_vocabulary(files):
    ckpt, folder = files
    a, b = Decoder.from_file(ckpt, slots=2), Decoder.from_file(folder, slots=2)
    assert a.config == b.config
    assert a.model.param_buffer.tobytes() == b.model.param_buffer.tobytes()
    assert b.tokenizer.pretokens == TOKENIZER.pretokens
    assert b.tokenizer.specials == TOKENIZER.specials
    ids = TOKENIZER.encode(PROMPTS[0])
    assert (a.feed(ids) == b.feed(ids)).all()
    assert b.checkpoint.format == "hf"


def test_infer_from_the_folder_equals_the_checkpoint(files):
    ckpt, folder = files
    out = [run_cli("infer", "--model", m, "--prompt", PROMPTS[1], "--max-new-tokens", 12,
                   "--temperature", 0) for m in (ckpt, folder)]
    assert out[0].returncode == 0 and out[1].returncode == 0, (out[0].stderr, out[1].stderr)
    assert out[0].stdout == out[1].stdout


@pytest.mark.slow
def test_served_folder_equals_served_checkpoint(files):
    pytest.importorskip("aiohttp")
    from test_serve import Server

    ckpt, folder = files
    texts = []
    for model in (ckpt, folder):
        s = Server(model, "--max-batch", 4)
        try:
            status, body = s.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": 12,
                                                      "temperature": 0})
            assert status == 200, body
            texts.append([c["text"] for c in body["choices"]])
            status, models = s.post("/v1/tokenize", {"prompt": PROMPTS[0]})
            assert status == 200 and models["tokens"] == TOKENIZER.encode(PROMPTS[0]).tolist()
            # the decode thread's CPU split (the benchmark's profile) counts this work
            cpu = {l.split('"')[1]: float(l.split()[-1]) for l in s.get("/metrics")[1].splitlines()
                   if l.startswith("mpitrain_decode_cpu_seconds_total{")}
            assert set(cpu) == {"kernel", "sample", "host"} and cpu["kernel"] > 0, cpu
            status, text = s.get("/v1/models")
            entry = json.loads(text)["data"][0]
            assert (entry["format"] == "hf") == (model == folder), entry
        finally:
            code, err = s.stop()
            assert code == 0, err
    assert texts[0] == texts[1]
    assert any(texts[0])


def _broken(folder, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    edit(bad)
    return bad


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "config.json").write_text(json.dumps(
        {**json.loads((d / "config.json").read_text()), "activation_function": "relu"})),
     "activation_function is 'relu'"),
    (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"), "cannot read"),
    (lambda d: (d / "tokenizer.json").write_text("{}"), "not a tokenizer written by export"),
])
def test_foreign_folders_are_one_line_errors(files, tmp_path, edit, fragment):
    bad = _broken(files[1], tmp_path, edit)
    assert_user_error(run_cli("infer", "--model", bad, "--prompt", "x", "--max-new-tokens", 2),
                      fragment)


def test_tensor_of_the_wrong_shape_is_refused(files, tmp_path):
    from safetensors.numpy import load_file, save_file

    def edit(d):
        t = load_file(str(d / "model.safetensors"))
        t["transformer.ln_f.bias"] = np.zeros(3, np.float32)
        save_file(t, str(d / "model.safetensors"))
    bad = _broken(files[1], tmp_path, edit)
    assert_user_error(run_cli("infer", "--model", bad, "--prompt", "x", "--max-new-tokens", 2),
                      "transformer.ln_f.bias has shape (3,)")
