"""The HTTP side of `mpitrain serve` (aiohttp): routes, bearer auth, OpenAI-shaped errors,
server-sent events. Handlers validate, queue sequences with the Scheduler and await their
events; they never touch the decoder.
"""
import asyncio
import hmac
import json
import os
import time

import numpy as np
from aiohttp import web

from mpitrain.sampler import Sampler, sample_seed
from mpitrain.serve import protocol
from mpitrain.serve.protocol import ApiError, CompletionRequest, error_body
from mpitrain.serve.scheduler import QueueFull, Sequence

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/tokenize", "/v1/detokenize")
MAX_BODY = 1 << 20             # bytes: a longer request body is refused (413)


class Service:
    """What the handlers share: the decoder's tokenizer and limits, the scheduler, metrics."""

    def __init__(self, decoder, scheduler, metrics, model_path, api_key=None,
                 max_tokens_cap=4096, max_n=None):
        self.dec, self.scheduler, self.metrics = decoder, scheduler, metrics
        self.tok = decoder.tokenizer
        self.api_key = api_key or None
        self.max_tokens_cap = int(max_tokens_cap)
        self.max_n = int(max_n or scheduler.max_queue)
        self.path = os.path.abspath(model_path)
        self.model_id = os.path.splitext(os.path.basename(model_path))[0]
        self.created = int(os.path.getmtime(model_path))


def json_response(obj, status=200):
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))


def build_app(svc: Service) -> web.Application:
    @web.middleware
    async def guard(request, handler):
        t0 = time.monotonic()
        label = request.path if request.path in ROUTES else "other"
        status = 500
        try:
            if svc.api_key and request.path != "/health":
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {svc.api_key}".encode()):
                    raise ApiError(401, "invalid or missing API key: send 'Authorization: "
                                   "Bearer KEY'", code="invalid_api_key")
            resp = await handler(request)
            status = resp.status
            return resp
        except ApiError as e:
            status = e.status
            return json_response(e.body(), e.status)
        except web.HTTPException as e:      # 404, 405, 413 from aiohttp itself
            status = e.status
            return json_response(error_body(f"{e.reason}: {request.method} {request.path}",
                                            code=e.status), e.status)
        finally:
            svc.metrics.request(label, status, time.monotonic() - t0)

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app["svc"] = svc
    r = app.router
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/models", models)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat)
    r.add_post("/v1/tokenize", tokenize)
    r.add_post("/v1/detokenize", detokenize)
    return app


async def _json(request):
    raw = await request.read()               # 413 past client_max_size
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


async def health(request):
    return json_response({"status": "ok"})


async def metrics(request):
    return web.Response(text=request.app["svc"].metrics.render(),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


async def models(request):
    svc = request.app["svc"]
    ck = svc.dec.checkpoint
    entry = {"id": svc.model_id, "object": "model", "created": svc.created,
             "owned_by": "mpitrain", "file": svc.path,
             "config": svc.dec.config.to_dict(), "max_model_len": svc.dec.max_context,
             "format": getattr(ck, "format", None), "step": getattr(ck, "step", None),
             "created_by": getattr(ck, "created_by", None)}
    return json_response({"object": "list", "data": [entry]})


async def chat(request):
    svc = request.app["svc"]
    raise ApiError(400, f"{svc.model_id} is not a chat model (a plain language model without "
                   "a chat template): use /v1/completions", code="model_not_supported")


async def _only(request, field: str, usage: str):
    """The one field a tokenizer route takes (besides "model"), or a 400 saying the usage."""
    body = await _json(request)
    if not isinstance(body, dict) or set(body) - {field, "model"}:
        raise ApiError(400, usage)
    return body.get(field)


async def tokenize(request):
    svc = request.app["svc"]
    text = await _only(request, "prompt", "tokenize takes {\"prompt\": TEXT}")
    if not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string", param="prompt")
    try:
        ids = svc.tok.encode(text)
    except ValueError as e:
        raise ApiError(400, f"'prompt': {e}", param="prompt") from None
    return json_response({"tokens": ids.tolist(), "count": int(ids.size),
                          "max_model_len": svc.dec.max_context})


async def detokenize(request):
    svc = request.app["svc"]
    ids = await _only(request, "tokens", "detokenize takes {\"tokens\": [ID, ...]}")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in ids):
        raise ApiError(400, "'tokens' must be a list of integers", param="tokens")
    try:
        text = svc.tok.decode(np.array(ids, np.int64))
    except ValueError as e:
        raise ApiError(400, f"'tokens': {e}", param="tokens") from None
    return json_response({"prompt": text})


# ---- completions --------------------------------------------------------------------------------

def _sequences(svc, req, sink):
    """The request's sequences (prompt-major, then sample), prompt texts, prompt lengths and
    warnings for prompts cut to the context."""
    T = svc.dec.max_context
    eod = svc.tok.eod_id
    seqs, texts, lengths, warnings = [], [], [], []
    for pi, p in enumerate(req.prompts):
        ids = svc.tok.encode(p) if isinstance(p, str) else np.array(p, np.int32)
        texts.append(p if isinstance(p, str) else svc.tok.decode(ids))
        if ids.size > T:
            warnings.append(f"prompt {pi} has {ids.size:,} tokens and the model's context holds "
                            f"{T}: using its last {T} tokens")
            ids = ids[-T:]
        lengths.append(int(ids.size))
        for j in range(req.n):
            s = Sequence(ids, req.max_tokens,
                         Sampler(req.temperature, req.top_k, req.top_p,
                                 sample_seed(req.seed, j)),
                         svc.tok, stop_ids=() if req.ignore_eos else (eod,), stops=req.stops,
                         logprobs=req.logprobs, sink=sink)
            s.index = len(seqs)
            seqs.append(s)
    return seqs, texts, lengths, warnings


async def completions(request):
    svc = request.app["svc"]
    body = await _json(request)
    req = CompletionRequest(body, svc.dec.config.vocab_size, svc.max_tokens_cap, svc.max_n)
    sink = asyncio.Queue()
    seqs, texts, lengths, warnings = _sequences(svc, req, sink)
    try:
        svc.scheduler.submit(seqs)
    except QueueFull as e:
        raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
    cid, created = protocol.completion_id(), protocol.now()
    try:
        if req.stream:
            return await _stream(request, svc, req, seqs, texts, lengths, warnings, sink, cid,
                                 created)
        return await _collect(svc, req, seqs, texts, lengths, warnings, sink, cid, created)
    finally:
        live = [s for s in seqs if s.finish_reason is None]
        if live:                          # the client went away or the server is stopping
            svc.scheduler.cancel(live)


def _usage(seqs, lengths, n):
    prompt = sum(lengths)
    done = sum(len(s.tokens) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _collect(svc, req, seqs, texts, lengths, warnings, sink, cid, created):
    entries = [[] for _ in seqs]
    left = len(seqs)
    while left:
        i, ev = await sink.get()
        if "finish" in ev:
            left -= 1
            if ev["finish"] == "error":
                raise ApiError(500, f"decoding failed: {ev.get('error')}", type_="server_error")
        elif req.logprobs is not None:
            entries[i].append((ev["token"], ev["logprob"], ev["top"], ev["offset"]))
    choices = []
    for s in seqs:
        prefix = texts[s.index // req.n] if req.echo else ""
        lp = None
        if req.logprobs is not None:
            lp = protocol.logprobs_obj(svc.tok, entries[s.index])
            lp["text_offset"] = [o + len(prefix) for o in lp["text_offset"]]
        choices.append({"index": s.index, "text": prefix + s.text, "logprobs": lp,
                        "finish_reason": s.finish_reason})
    return json_response(protocol.completion(cid, created, svc.model_id, choices,
                                             _usage(seqs, lengths, req.n), warnings))


async def _stream(request, svc, req, seqs, texts, lengths, warnings, sink, cid, created):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(choices, **extra):
        obj = {"id": cid, "object": "text_completion", "created": created,
               "model": svc.model_id, "choices": choices, **extra}
        await resp.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    first = {"warnings": warnings} if warnings else {}
    if req.echo:
        for s in seqs:
            await send([{"index": s.index, "text": texts[s.index // req.n], "logprobs": None,
                         "finish_reason": None}], **first)
            first = {}
    left = len(seqs)
    while left:
        i, ev = await sink.get()
        if "finish" in ev:
            left -= 1
            if ev["finish"] == "error":
                await send([], error=error_body(f"decoding failed: {ev.get('error')}",
                                                "server_error")["error"])
                continue
            await send([{"index": i, "text": ev["text"], "logprobs": None,
                         "finish_reason": ev["finish"]}], **first)
        else:
            lp = None
            if req.logprobs is not None:
                lp = protocol.logprobs_obj(svc.tok, [(ev["token"], ev["logprob"], ev["top"],
                                                      ev["offset"])])
            await send([{"index": i, "text": ev["text"], "logprobs": lp,
                         "finish_reason": None}], **first)
        first = {}
    if req.include_usage:
        await send([], usage=_usage(seqs, lengths, req.n))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp
