"""`mpitrain infer` through the real command line (python -m mpitrain infer ...).

Proofs held here: greedy output is deterministic and is the text of a float64 NumPy reference
decode of the same weights (first 20 tokens, across a context slide); an export gives the same
text as its checkpoint; a prompt longer than the context is cut from the left with a notice;
a checkpoint written by a real (mpirun) training run generates; the interactive loop applies
its commands and keeps its context until /reset; bad input ends with one line and exit 2.
"""
import os
import sys

import numpy as np
import pytest

from conftest import assert_user_error, run_cli
from mpitrain.checkpoint import load_checkpoint
from test_generate_support import (CONFIG, TOKENIZER, reference_greedy, save_model, scaled_model,
                                   tiny_run_dir)
from test_train_support import tiny_dataset  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow  # the command line in subprocesses, a real training run

PROMPT = " the quick brown fox"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    model = scaled_model(seed=6)
    path = save_model(tmp_path_factory.mktemp("infer") / "model.h5", model)
    return path, model


def _text(ids):
    eod = TOKENIZER.eod_id
    if eod in ids:
        ids = ids[:ids.index(eod)]
    return TOKENIZER.decode_bytes(ids).decode("utf-8", "replace")


def _greedy(path, prompt=PROMPT, n=20, *extra):
    return run_cli("infer", "--model", path, "--prompt", prompt, "--temperature", 0,
                   "--max-new-tokens", n, *extra)


@pytest.mark.numerics
def test_greedy_matches_numpy_reference_and_repeats(model_file):
    path, model = model_file
    ref = reference_greedy(model.params, CONFIG, TOKENIZER.encode(PROMPT), 20,
                           stop_id=TOKENIZER.eod_id)
    first = _greedy(path)
    assert first.returncode == 0, first.stderr
    assert first.stdout == _text(ref) + "\n"
    assert first.stderr == ""
    again = _greedy(path, PROMPT, 20, "--threads", 2)
    assert again.stdout == first.stdout


def test_export_generates_the_same(model_file, tmp_path):
    path, _ = model_file
    out = tmp_path / "weights.h5"
    assert run_cli("export", path, "--out", out).returncode == 0
    assert _greedy(out).stdout == _greedy(path).stdout


def test_long_prompt_cut_from_the_left(model_file):
    path, model = model_file
    prompt = " the lazy dog jumps over the quick brown fox and" * 4
    ids = TOKENIZER.encode(prompt)
    assert ids.size > CONFIG.max_seq_len
    proc = _greedy(path, prompt, 12, "--stats")
    assert proc.returncode == 0, proc.stderr
    ref = reference_greedy(model.params, CONFIG, ids[-CONFIG.max_seq_len:], 12,
                           stop_id=TOKENIZER.eod_id)
    assert proc.stdout == _text(ref) + "\n"
    lines = proc.stderr.splitlines()
    assert f"the prompt has {ids.size} tokens" in lines[0]
    assert f"using its last {CONFIG.max_seq_len} tokens" in lines[0]
    assert "tokens/s" in lines[1]


def test_sampling_is_seeded(model_file):
    path, _ = model_file

    def run(seed):
        return run_cli("infer", "--model", path, "--prompt", PROMPT, "--seed", seed,
                       "--temperature", 1.0, "--top-k", 50, "--top-p", 0.95,
                       "--max-new-tokens", 30).stdout
    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c


def test_interactive_session(model_file):
    import subprocess
    import sys

    from conftest import REPO

    path, model = model_file
    script = "\n".join(["/temp 0", "/len 6", PROMPT, "/show", "/bogus", "/temp -3", "/reset",
                        "/show", PROMPT, ""])
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "infer", "--model", path,
                           "--interactive"], input=script, capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ref = _text(reference_greedy(model.params, CONFIG, TOKENIZER.encode(PROMPT), 6,
                                 stop_id=TOKENIZER.eod_id))
    out = proc.stdout
    assert out.count(ref + "\n") == 2                     # the same answer before and after /reset
    assert "length 6" in out and "temperature 0" in out
    n_ctx = TOKENIZER.encode(PROMPT).size + 6
    assert f"context {min(n_ctx, CONFIG.max_seq_len)}/16 tokens" in out
    assert "context 0/16 tokens" in out
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and "unknown command /bogus" in errors[0]
    assert "--temperature must be in [0, 100]" in errors[1]


def test_checkpoint_of_a_real_training_run(tiny_dataset, tmp_path):  # noqa: F811
    run_dir = tiny_run_dir(tmp_path, tiny_dataset)
    ck = os.path.join(run_dir, "checkpoint_step_10.h5")
    a = run_cli("infer", "--model", ck, "--prompt", "the quick", "--temperature", 0,
                "--max-new-tokens", 20)
    assert a.returncode == 0, a.stderr
    ck_read = load_checkpoint(ck)
    tok = ck_read.tokenizer
    ref = reference_greedy(ck_read.params, ck_read.model_config, tok.encode("the quick"), 20,
                           stop_id=tok.eod_id)
    if tok.eod_id in ref:
        ref = ref[:ref.index(tok.eod_id)]
    assert a.stdout == tok.decode_bytes(ref).decode("utf-8", "replace") + "\n"
    b = run_cli("infer", "--model", ck, "--prompt", "the quick", "--temperature", 0,
                "--max-new-tokens", 20)
    assert a.stdout == b.stdout


def test_bad_inputs(model_file, tiny_dataset, tmp_path, monkeypatch):  # noqa: F811
    path, _ = model_file
    truncated = tmp_path / "truncated.h5"
    data = open(path, "rb").read()
    truncated.write_bytes(data[:len(data) // 2])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    diverged = scaled_model(seed=6)
    diverged.params["transformer.h.1.mlp.c_fc.weight"][3, 4] = np.nan
    import mpitrain.checkpoint as ckpt

    with monkeypatch.context() as mp:   # as an older mpitrain wrote a diverged run's state
        mp.setattr(ckpt, "nonfinite_problem", lambda where, arr: None)
        nan_file = save_model(tmp_path / "nan.h5", diverged)   # valid checksums, NaN inside
    cases = [
        (["--model", tmp_path / "missing.h5", "--prompt", "x"], "no such file"),
        (["--model", truncated, "--prompt", "x"], "truncated"),
        (["--model", text, "--prompt", "x"], "not a readable HDF5 file"),
        (["--model", tiny_dataset, "--prompt", "x"], "is a dataset"),
        (["--model", nan_file, "--prompt", "x"],
         "/params/transformer.h.1.mlp.c_fc.weight is not finite: 1 NaN"),
        (["--model", path, "--prompt", ""], "the prompt is empty"),
        (["--model", path, "--prompt", "x", "--prompt-file", path], "not both"),
        (["--model", path, "--prompt-file", tmp_path / "none.txt"], "no such file"),
        (["--model", path, "--prompt", "x", "--num-samples", 0], "--num-samples must be"),
        (["--model", path], "give --prompt"),
        (["--model", path, "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--model", path, "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["--model", path, "--prompt", "x", "--top-k", "-1"], "--top-k"),
        (["--model", path, "--prompt", "x", "--top-k", "100000"], "--top-k must be in [0, 277]"),
        (["--model", path, "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--model", path, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--model", path, "--prompt", "x", "--threads", "0"], "--threads"),
        (["--model", path, "--prompt", "x", "--seed", "-5"], "--seed"),
        (["--model", path, "--prompt", "x", "--top-p", "abc"], "invalid float value"),
    ]
    for argv, fragment in cases:
        assert_user_error(run_cli("infer", *argv), fragment)


def test_reader_going_away_is_not_an_error(model_file):
    """`mpitrain infer ... | head -c 20`: the closed pipe ends generation quietly, exit 0."""
    import subprocess
    import sys

    from conftest import REPO

    path, _ = model_file
    proc = subprocess.Popen([sys.executable, "-m", "mpitrain", "infer", "--model", path,
                             "--prompt", PROMPT, "--max-new-tokens", "1000000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO))
    proc.stdout.read(20)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == ""


def test_interactive_ctrl_c_stops_a_generation(tmp_path):
    """SIGINT during a long answer stops it ("[stopped]") and the loop goes on."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    # A model that says " the" forever: the final LayerNorm outputs a constant and only the
    # lm_head row of " the" is non-zero, so the end-of-document token never comes.
    model = scaled_model(seed=6)
    model.params["transformer.ln_f.weight"][...] = 0.0
    model.params["transformer.ln_f.bias"][...] = 0.1
    model.params["lm_head.weight"][...] = 0.0
    the = int(TOKENIZER.encode(" the")[0])
    model.params["lm_head.weight"][the] = 1.0
    path = save_model(tmp_path / "the.h5", model)
    proc = subprocess.Popen([sys.executable, "-m", "mpitrain", "infer", "--model", path,
                             "--interactive", "--temperature", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    proc.stdin.write(f"/len 1000000\n{PROMPT}\n")
    proc.stdin.flush()
    got = ""
    t0 = time.monotonic()
    while got.count(" the the the the the") < 10:       # the answer is streaming
        got += os.read(proc.stdout.fileno(), 4096).decode("utf-8", "replace")
        assert time.monotonic() - t0 < 60 and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/show\n", timeout=60)
    assert proc.returncode == 0, err
    assert "[stopped]" in out and "length 1000000" in out
    assert "Traceback" not in err


def test_terminal_without_utf8(model_file):
    """Text the terminal's encoding cannot show is replaced ('?'), not a crash."""
    import subprocess
    import sys

    from conftest import REPO

    path, model = model_file
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONIOENCODING="ascii")
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "infer", "--model", path,
                           "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20"],
                          capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ref = reference_greedy(model.params, CONFIG, TOKENIZER.encode(PROMPT), 20,
                           stop_id=TOKENIZER.eod_id)
    assert proc.stdout.decode("ascii") == _text(ref).encode("ascii", "replace").decode() + "\n"


def test_prompt_from_a_file_or_stdin_echo_and_several_samples(model_file, tmp_path):
    import subprocess

    path, _ = model_file
    plain = _greedy(path)
    assert plain.returncode == 0, plain.stderr
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    from_file = run_cli("infer", "--model", path, "--prompt-file", prompt_file,
                        "--temperature", 0, "--max-new-tokens", 20)
    assert (from_file.returncode, from_file.stdout) == (0, plain.stdout), from_file.stderr
    from conftest import REPO
    env = dict(os.environ, PYTHONPATH=REPO)
    from_stdin = subprocess.run([sys.executable, "-m", "mpitrain", "infer", "--model", str(path),
                                 "--prompt", "-", "--temperature", "0", "--max-new-tokens",
                                 "20"], input=PROMPT, env=env, capture_output=True, text=True,
                                timeout=120)
    assert (from_stdin.returncode, from_stdin.stdout) == (0, plain.stdout), from_stdin.stderr
    echoed = _greedy(path, PROMPT, 20, "--echo")
    assert echoed.stdout == PROMPT + plain.stdout
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    assert_user_error(run_cli("infer", "--model", path, "--prompt-file", bad), "not UTF-8")

    # sample i is the single run with seed S + i
    def sampled(*extra):
        p = run_cli("infer", "--model", path, "--prompt", PROMPT, "--temperature", 1.0,
                    "--max-new-tokens", 15, *extra)
        assert p.returncode == 0, p.stderr
        return p.stdout
    three = sampled("--seed", 4, "--num-samples", 3)
    singles = [sampled("--seed", 4 + i) for i in range(3)]
    assert len(set(singles)) > 1
    assert three == "\n".join(f"--- sample {i + 1} of 3 (seed {4 + i}) ---\n{one}"
                               for i, one in enumerate(singles))
