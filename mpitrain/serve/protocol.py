"""Requests and responses of the completions API: validation of every field (a mistake is an
ApiError: HTTP status and the OpenAI error shape) and the JSON objects sent back.

Fields supported, refused and ignored are listed in docs/SERVING.md; this module is where they
are decided.
"""
import math
import time
import uuid

MAX_TEMPERATURE = 100.0      # as `infer --temperature`
MAX_SEED = 2 ** 63 - 1       # as `infer --seed`
MAX_LOGPROBS = 20
MAX_STOPS = 16


class ApiError(Exception):
    """A request the service refuses: HTTP status and the OpenAI-shaped error body."""

    def __init__(self, status, message, param=None, type_="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (status, message, param,
                                                                       type_, code)

    def body(self):
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message, type_="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad(param, message):
    return ApiError(400, f"'{param}': {message}", param=param)


def _int(body, name, default, lo, hi):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(name, f"must be an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"must lie in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


def _num(body, name, default, ok, what):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(name, f"must be a number, got {type(v).__name__}")
    v = float(v)
    if not (math.isfinite(v) and ok(v)):
        raise _bad(name, f"must be {what}, got {v:g}")
    return v


def _bool(body, name):
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(name, f"must be true or false, got {type(v).__name__}")
    return v


FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
          "stream", "stream_options", "echo", "logprobs", "ignore_eos", "best_of",
          "presence_penalty", "frequency_penalty", "logit_bias", "suffix", "user"}


class CompletionRequest:
    """A validated POST /v1/completions body. prompts: a list of str or of id lists."""

    def __init__(self, body, vocab_size, max_tokens_cap, max_n):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field{'s' * (len(unknown) > 1)} "
                           f"{', '.join(map(repr, unknown))} (docs/SERVING.md lists the "
                           "supported ones)", param=unknown[0])
        self.model = body.get("model")
        if self.model is not None and not isinstance(self.model, str):
            raise _bad("model", "must be a string")
        self.prompts = _prompts(body.get("prompt"), vocab_size)
        self.max_tokens = _int(body, "max_tokens", 16, 1, max_tokens_cap)
        self.temperature = _num(body, "temperature", 1.0, lambda v: 0 <= v <= MAX_TEMPERATURE,
                                f"in [0, {MAX_TEMPERATURE:g}]")
        self.top_p = _num(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
        self.top_k = _int(body, "top_k", 0, 0, vocab_size)
        self.seed = _int(body, "seed", None, 0, MAX_SEED)
        self.n = _int(body, "n", 1, 1, max_n)
        best_of = _int(body, "best_of", self.n, 1, max_n)
        if best_of != self.n:
            raise _bad("best_of", "is not supported (only best_of == n)")
        self.stream = _bool(body, "stream")
        self.echo = _bool(body, "echo")
        self.ignore_eos = _bool(body, "ignore_eos")
        self.logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        if self.echo and self.logprobs is not None:
            raise _bad("logprobs", "with echo (log-probabilities of the prompt) is not supported")
        self.stops = _stops(body.get("stop"))
        for name in ("presence_penalty", "frequency_penalty"):
            _num(body, name, 0.0, lambda v: v == 0, "0 (penalties are not supported)")
        if body.get("logit_bias") not in (None, {}):
            raise _bad("logit_bias", "is not supported")
        if body.get("suffix") not in (None, ""):
            raise _bad("suffix", "is not supported (insertion needs a model trained for it)")
        opts = body.get("stream_options")
        if opts is not None:
            if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
                raise _bad("stream_options", "takes only {\"include_usage\": true|false}")
            if not self.stream:
                raise _bad("stream_options", "is only allowed with stream: true")
        self.include_usage = bool((opts or {}).get("include_usage", False))
        if not isinstance(opts.get("include_usage", False) if opts else False, bool):
            raise _bad("stream_options", "include_usage must be true or false")
        if len(self.prompts) * self.n > max_n:
            raise ApiError(400, f"{len(self.prompts)} prompts x n={self.n} make more sequences "
                           f"than one request may ask for ({max_n})", param="n")


def _prompts(p, vocab_size):
    if p is None:
        raise ApiError(400, "'prompt' is required", param="prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                           for t in p):
        p = [p]                           # one prompt given as token ids
    if not isinstance(p, list) or not p:
        raise _bad("prompt", "must be a string, a list of strings, or token ids")
    for x in p:
        if isinstance(x, str):
            if not x:
                raise _bad("prompt", "is empty: give some text to continue")
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise _bad("prompt", "holds a lone surrogate (not Unicode text)") from None
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in x):
            if min(x) < 0 or max(x) >= vocab_size:
                raise _bad("prompt", f"token ids must lie in [0, {vocab_size})")
        else:
            raise _bad("prompt", "must be a string, a list of strings, or token ids")
    return p


def _stops(stop):
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", "must be a non-empty string or a list of them")
    if len(stop) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop strings")
    return tuple(stop)


# ---- responses ----------------------------------------------------------------------------------

def completion_id():
    return f"cmpl-{uuid.uuid4().hex}"


def logprobs_obj(tok, entries):
    """OpenAI completions `logprobs` from [(id, logprob, top, offset), ...]."""
    def s(i):
        return tok.token_bytes(i).decode("utf-8", errors="backslashreplace")
    return {"tokens": [s(i) for i, _, _, _ in entries],
            "token_logprobs": [lp for _, lp, _, _ in entries],
            "top_logprobs": [{s(i): lp for i, lp in top} for _, _, top, _ in entries],
            "text_offset": [off for _, _, _, off in entries]}


def completion(cid, created, model, choices, usage, warnings):
    out = {"id": cid, "object": "text_completion", "created": created, "model": model,
           "choices": choices, "usage": usage}
    if warnings:
        out["warnings"] = warnings
    return out


def now():
    return int(time.time())
