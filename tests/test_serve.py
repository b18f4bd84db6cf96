"""`mpitrain serve` through the real command line: a server subprocess on a free port, spoken
to with plain HTTP (http.client, no proxy) and with the official openai client.

Proofs held here: greedy completions equal `infer --temperature 0`, also for several prompts
sent at once (and each equals the same prompt sent alone, while the metrics show they shared
decode steps); `n` and `seed` follow infer's seed rule; streaming sends one chunk per token and
`data: [DONE]`; stop strings, logprobs, echo, tokenize round trip, a prompt longer than the
context; every bad request is a 4xx JSON error in the OpenAI shape and the server keeps
serving, also after a client disconnects mid-stream; bearer auth; SIGTERM exits 0; without the
extra the command says how to install it.
"""
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from test_generate_support import TOKENIZER, save_model, scaled_model

pytest.importorskip("aiohttp")
pytestmark = pytest.mark.slow  # a server subprocess

PROMPT = " the quick brown fox"
PROMPTS = [" the", " quick brown fox jumps", "over the lazy dog and", " to in is it that",
           "we you"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, *extra):
        self.port = _free_port()
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("MPITRAIN_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpitrain", "serve", "--model", model, "--port",
             str(self.port), *map(str, extra)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        c.request(method, path, body=data, headers=headers or {})
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        return r.status, text

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        status, text = self.request("POST", path, body, **kw)
        if path == "/v1/completions" and (body or {}).get("stream"):
            return status, text
        return status, json.loads(text)

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("serve") / "model.h5", scaled_model(seed=6))


@pytest.fixture(scope="module")
def server(model_path):
    s = Server(model_path, "--max-batch", 4, "--max-queue", 64)
    yield s
    code, err = s.stop()
    assert code == 0, err


def _complete(server, prompt, **kw):
    status, body = server.post("/v1/completions", {"prompt": prompt, **kw})
    assert status == 200, body
    return body


def _infer_text(model_path, prompt, n, *extra):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "mpitrain", "infer", "--model", model_path,
                           "--prompt", prompt, "--max-new-tokens", str(n), *map(str, extra)],
                          env=env, capture_output=True, timeout=120)   # bytes: keep \r as is
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode()[:-1]          # infer ends its output with a newline


def test_greedy_equals_infer(server, model_path):
    body = _complete(server, PROMPT, max_tokens=20, temperature=0)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == _infer_text(model_path, PROMPT, 20, "--temperature", 0)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] == TOKENIZER.encode(PROMPT).size


def _metric(server, name):
    _, text = server.get("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_concurrent_greedy_equals_alone_and_infer(server, model_path):
    # 5 prompts x 30 tokens (past the 16-token context: slides too) with 4 slots: they share
    # steps, one waits in the queue and joins the running batch when a slot frees
    kw = dict(max_tokens=30, temperature=0, ignore_eos=True)
    alone = [_complete(server, p, **kw)["choices"][0]["text"] for p in PROMPTS]
    single_before = _metric(server, 'mpitrain_batch_size_bucket{le="1"}')
    steps_before = _metric(server, "mpitrain_batch_size_count")
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS) + 2) as pool:
        noise = [pool.submit(_complete, server, "noise", max_tokens=25, temperature=1.0,
                             seed=s) for s in (1, 2)]
        together = list(pool.map(lambda p: _complete(server, p, **kw)["choices"][0]["text"],
                                 PROMPTS))
        [f.result() for f in noise]
    assert together == alone
    shared = (_metric(server, "mpitrain_batch_size_count") - steps_before
              - (_metric(server, 'mpitrain_batch_size_bucket{le="1"}') - single_before))
    assert shared > 0, "no decode step held more than one sequence"
    # without ignore_eos the same greedy decode is what infer prints
    for p in PROMPTS[:2]:
        got = _complete(server, p, max_tokens=30, temperature=0)["choices"][0]["text"]
        assert got == _infer_text(model_path, p, 30, "--temperature", 0)


def test_n_and_seed_follow_infers_rule(server, model_path):
    kw = dict(max_tokens=8, temperature=1.0, top_p=0.9, ignore_eos=True)
    many = _complete(server, PROMPT, n=3, seed=5, **kw)["choices"]
    assert [c["index"] for c in many] == [0, 1, 2]
    for i, c in enumerate(many):
        assert c["text"] == _complete(server, PROMPT, seed=5 + i, **kw)["choices"][0]["text"]
    assert len({c["text"] for c in many}) > 1
    eos = _complete(server, PROMPT, n=1, seed=5, max_tokens=8, temperature=1.0, top_p=0.9)
    assert eos["choices"][0]["text"] == _infer_text(model_path, PROMPT, 8, "--temperature", 1,
                                                    "--top-p", 0.9, "--seed", 5)
    two = _complete(server, [PROMPT, "dog"], n=2, seed=1, **kw)["choices"]
    # choices are prompt-major: (prompt 0, sample 0), (prompt 0, sample 1), (prompt 1, ...)
    assert len(two) == 4
    for k, (p, i) in enumerate([(PROMPT, 0), (PROMPT, 1), ("dog", 0), ("dog", 1)]):
        assert two[k]["text"] == _complete(server, p, seed=1 + i, **kw)["choices"][0]["text"]


def _events(text):
    chunks = [c for c in text.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks), chunks
    assert chunks[-1] == "data: [DONE]"
    return [json.loads(c[len("data: "):]) for c in chunks[:-1]]


def test_streaming_one_chunk_per_token(server):
    kw = dict(max_tokens=12, temperature=0, ignore_eos=True)
    whole = _complete(server, PROMPT, **kw)
    status, text = server.post("/v1/completions", {"prompt": PROMPT, "stream": True,
                                                   "stream_options": {"include_usage": True},
                                                   **kw})
    assert status == 200
    events = _events(text)
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    chunks = [e["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["finish_reason"] for c in chunks[:-1]] == [None] * 12
    assert chunks[-1]["finish_reason"] == "length"


def test_stop_string_echo_and_logprobs(server):
    full = _complete(server, PROMPT, max_tokens=20, temperature=0, ignore_eos=True)
    text = full["choices"][0]["text"]
    stop = text[5:8]
    cut = _complete(server, PROMPT, max_tokens=20, temperature=0, ignore_eos=True, stop=[stop])
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    status, streamed = server.post("/v1/completions", {
        "prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
        "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in _events(streamed)) == text[:text.index(stop)]
    echo = _complete(server, PROMPT, max_tokens=20, temperature=0, ignore_eos=True, echo=True)
    assert echo["choices"][0]["text"] == PROMPT + text
    lp = _complete(server, PROMPT, max_tokens=6, temperature=0, ignore_eos=True,
                   logprobs=3)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3
        # greedy: the chosen token is the most likely one (same float64 values)
        assert chosen == max(top.values()) and chosen <= 0
        assert sum(np.exp(list(top.values()))) <= 1 + 1e-9


def test_long_prompt_cut_from_the_left(server, model_path):
    prompt = " the quick brown fox jumps over the lazy dog" * 4     # > 16 tokens
    body = _complete(server, prompt, max_tokens=10, temperature=0)
    assert "using its last 16 tokens" in body["warnings"][0]
    assert body["usage"]["prompt_tokens"] == 16
    assert body["choices"][0]["text"] == _infer_text(model_path, prompt, 10, "--temperature", 0)


def test_tokenize_round_trip_and_models(server, model_path):
    text = "The fox 😀 and the dog\n"
    status, tok = server.post("/v1/tokenize", {"prompt": text})
    assert status == 200 and tok["tokens"] == TOKENIZER.encode(text).tolist()
    status, back = server.post("/v1/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and back["prompt"] == text
    status, text = server.get("/v1/models")
    entry = json.loads(text)["data"][0]
    assert entry["id"] == "model" and entry["file"] == os.path.abspath(model_path)
    assert entry["config"]["max_seq_len"] == 16 and entry["created_by"]["program"] == "mpitrain"


BAD = [
    ({"raw": b"{not json"}, 400),
    ({"body": [1, 2]}, 400),
    ({"body": {"prompt": PROMPT, "max_tokens": "5"}}, 400),
    ({"body": {"prompt": PROMPT, "temperature": "hot"}}, 400),
    ({"body": {"prompt": 5}}, 400),
    ({"body": {"prompt": PROMPT, "stream": "yes"}}, 400),
    ({"body": {"prompt": PROMPT, "colour": "blue"}}, 400),
    ({"body": {"prompt": PROMPT, "max_tokens": -1}}, 400),
    ({"body": {"prompt": PROMPT, "max_tokens": 10 ** 9}}, 400),
    ({"body": {"prompt": PROMPT, "n": 0}}, 400),
    ({"body": {"prompt": PROMPT, "top_p": 0}}, 400),
    ({"body": {"prompt": ""}}, 400),
    ({"body": {"prompt": [1, 99999]}}, 400),
    ({"body": {"max_tokens": 3}}, 400),
    ({"body": {"prompt": PROMPT, "presence_penalty": 0.5}}, 400),
    ({"body": {"prompt": PROMPT, "n": 65}}, 400),
    ({"raw": b'{"prompt": "' + b"a" * (10 << 20) + b'"}'}, 413),
]


@pytest.mark.parametrize("req,status", BAD, ids=range(len(BAD)))
def test_bad_requests_are_json_errors(server, req, status):
    got, text = server.request("POST", "/v1/completions", req.get("body"), raw=req.get("raw"))
    assert got == status, text
    err = json.loads(text)["error"]
    assert err["message"] and err["type"]
    assert _complete(server, PROMPT, max_tokens=2)["choices"]


def test_other_errors(server):
    status, body = server.post("/v1/chat/completions", {"messages": []})
    assert status == 400 and "not a chat model" in body["error"]["message"]
    status, text = server.get("/v1/nothing")
    assert status == 404 and json.loads(text)["error"]
    status, text = server.get("/v1/completions")
    assert status == 405 and json.loads(text)["error"]


def test_disconnect_mid_stream_cancels(server):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4096, "ignore_eos": True,
                       "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    got = b""
    while got.count(b"data: ") < 3:
        part = s.recv(4096)
        assert part, got
        got += part
    s.close()
    deadline = time.monotonic() + 30
    while _metric(server, "mpitrain_running_sequences") != 0:
        assert time.monotonic() < deadline, "the disconnected stream kept decoding"
        time.sleep(0.1)
    assert _complete(server, PROMPT, max_tokens=3)["choices"]


def test_openai_client(server, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    client = openai.OpenAI(api_key="unused", base_url=f"http://127.0.0.1:{server.port}/v1")
    r = client.completions.create(model="model", prompt=PROMPT, max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = _complete(server, PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    assert r.choices[0].text == want["choices"][0]["text"]
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    parts = [c.choices[0].text for c in client.completions.create(
        model="model", prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True})]
    assert "".join(parts) == r.choices[0].text
    assert [m.id for m in client.models.list().data] == ["model"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="model", prompt=PROMPT, max_tokens=-3)


def test_api_key_and_sigterm(model_path, monkeypatch):
    s = Server(model_path, "--api-key", "sekrit")
    try:
        assert s.request("POST", "/v1/completions", {"prompt": PROMPT})[0] == 401
        status, text = s.request("POST", "/v1/completions", {"prompt": PROMPT},
                                 headers={"Authorization": "Bearer wrong"})
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
        assert s.get("/metrics")[0] == 401
        ok = {"Authorization": "Bearer sekrit"}
        assert s.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2},
                         headers=ok)[0] == 200
        # a stream running when SIGTERM comes is let finish
        body = json.dumps({"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True,
                           "stream": True})
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        c.request("POST", "/v1/completions", body=body, headers=ok)
        r = c.getresponse()
        assert r.read(6) == b"data: "
        s.proc.send_signal(signal.SIGTERM)
        rest = r.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        c.close()
        code = s.proc.wait(timeout=60)
        err = s.proc.stderr.read()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()
    assert code == 0, err
    assert "stopped" in err


def test_without_the_extra_says_how_to_install(model_path):
    code = ("import sys; sys.modules['aiohttp'] = None; from mpitrain.cli import main; "
            f"sys.exit(main(['serve', '--model', {model_path!r}]))")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "pip install 'mpitrain[serve]'" in proc.stderr


def test_port_in_use_is_one_line(model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-m", "mpitrain", "serve", "--model", model_path,
                               "--port", str(port)], env=env, capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mpitrain: error: cannot listen on") and \
        proc.stderr.count("\n") == 1
