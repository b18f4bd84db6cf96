"""Continuous batching over a Decoder's slots, in one decode thread.

A completion request becomes one Sequence per (prompt, sample). `submit` puts sequences in the
waiting queue (bounded: QueueFull when it would pass max_queue) and returns at once; the decode
thread, each step:
  1. admits waiting sequences into free slots (reset, then the whole prompt is this step's feed
     for that slot), dropping any cancelled while they waited;
  2. feeds every other running sequence its last sampled id;
  3. runs one Decoder.step over all of them (batch-invariant: a sequence's logits do not depend
     on what shares the step) and samples every row at once with mpitrain.sampler.sample, each
     row with its own settings and generator;
  4. hands each sequence its id; a sequence that ends (end of document, a stop string,
     max_tokens) or was cancelled leaves its slot, free for the next step.
Events (a token's text and log-probabilities, the end) are posted to the asyncio loop in one
call per step; the HTTP side never calls into the decoder and the decode thread never waits on
a client. The kernel call releases the GIL, so the event loop keeps serving during a step.
"""
import codecs
import threading
import time
from collections import deque

import numpy as np

from mpitrain.sampler import sample


class QueueFull(Exception):
    pass


class Sequence:
    """One prompt continued once. prompt: int ids (already cut to the context); stop_ids: ids
    that end it with finish_reason "stop" (the end-of-document id unless ignore_eos) without
    being part of the text; stops: strings that end it, the text cut before them; logprobs:
    None or how many top alternatives to report per token."""

    def __init__(self, prompt, max_tokens, sampler, tokenizer, stop_ids=(), stops=(),
                 logprobs=None, sink=None):
        self.prompt = np.asarray(prompt, np.int32)
        self.max_tokens, self.sampler, self.tok = int(max_tokens), sampler, tokenizer
        self.stop_ids, self.stops, self.logprobs = frozenset(stop_ids), tuple(stops), logprobs
        self._hold = max((len(s) for s in self.stops), default=0)
        self.sink = sink                 # asyncio.Queue the events go to, as (index, event)
        self.index = 0                   # the choice's index in its response
        self.slot = None
        self.last = None
        self.tokens = []                 # generated ids in the text
        self.text = ""                   # text handed out so far
        self._pending = ""               # decoded text held back (may start a stop string)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.cancelled = False
        self.finish_reason = None
        self.t_submit = time.monotonic()
        self.t_first = None

    def advance(self, tid, logprob=None, top=None):
        """Take the sampled id; returns the events for the client (decode thread)."""
        if tid in self.stop_ids:
            return self._finish("stop")
        self.tokens.append(tid)
        start = len(self.text) + len(self._pending)
        full = self.text + self._pending + self._utf8.decode(self.tok.token_bytes(tid))
        ev = {"token": tid, "logprob": logprob, "top": top, "offset": len(self.text)}
        if self.stops:
            lo = max(0, start - self._hold + 1)
            hits = [i for i in (full.find(s, lo) for s in self.stops) if i >= 0]
            if hits:
                ev["text"] = full[len(self.text):min(hits)]
                self.text = full[:min(hits)]
                self._pending = ""
                return [ev] + self._finish("stop", flush=False)
        keep = _held_back(full, self.stops, len(self.text))
        ev["text"] = full[len(self.text):len(full) - keep]
        self.text, self._pending = full[:len(full) - keep], full[len(full) - keep:]
        if len(self.tokens) >= self.max_tokens:
            return [ev] + self._finish("length")
        return [ev]

    def _finish(self, reason, flush=True):
        self.finish_reason = reason
        tail = ""
        if flush:
            tail = self._pending + self._utf8.decode(b"", final=True)
            self._pending = ""
            self.text += tail
        return [{"finish": reason, "text": tail}]


def _held_back(full, stops, emitted):
    """Length of the longest suffix of full[emitted:] that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(full) - emitted), best, -1):
            if s.startswith(full[len(full) - k:]):
                best = k
                break
    return best


class Scheduler:
    def __init__(self, decoder, metrics, max_queue, loop=None):
        self.dec, self.metrics, self.max_queue = decoder, metrics, int(max_queue)
        self.loop = loop
        self.waiting = deque()
        self.running = {}                  # slot -> Sequence (decode thread only)
        self.free = list(range(decoder.slots))[::-1]
        self.threads = decoder.model.threads   # the sampler's too: it runs between steps
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mpitrain-decode", daemon=True)

    def start(self, loop):
        self.loop = loop
        self._thread.start()

    def submit(self, seqs):
        """Queue all of seqs or none (QueueFull)."""
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting and the queue "
                                f"holds {self.max_queue}: try again later")
            self.waiting.extend(seqs)
            self.metrics.gauges(len(self.waiting), len(self.running))
            self._cv.notify()

    def cancel(self, seqs):
        for s in seqs:
            s.cancelled = True
        with self._cv:
            self._cv.notify()

    def close(self, timeout=10.0):
        """Stop the decode thread; sequences still waiting or running end "cancelled"."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the decode thread --------------------------------------------------------------------

    def _post(self, events):
        if events and self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:          # the loop closed meanwhile
                pass

    def _run(self):
        try:
            while self._step():
                pass
        finally:
            with self._cv:
                left = list(self.waiting) + list(self.running.values())
                self.waiting.clear()
                self.running.clear()
            self._post([(s, {"finish": "cancelled", "text": ""}) for s in left])

    def _step(self):
        t0 = time.thread_time()
        events = []
        with self._cv:
            while not self._stop and not self.waiting and not self.running:
                self._cv.wait()
            if self._stop:
                return False
            self._retire_cancelled(events)
            admitted = []
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    events.append((seq, {"finish": "cancelled", "text": ""}))
                    continue
                admitted.append((self.free.pop(), seq))
        feeds, seqs = [], []
        for slot, seq in self.running.items():
            feeds.append((slot, [seq.last]))
            seqs.append(seq)
        prompt_tokens = 0
        for slot, seq in admitted:
            self.dec.reset(slot)
            self.running[slot] = seq
            seq.slot = slot
            feeds.append((slot, seq.prompt))
            seqs.append(seq)
            prompt_tokens += seq.prompt.size
        self.metrics.gauges(len(self.waiting), len(self.running))
        if not feeds:
            self._post(events)
            return True
        try:
            t1 = time.thread_time()
            logits = self.dec.step(feeds)
            t2 = time.thread_time()
            ids = sample(logits, [s.sampler for s in seqs], self.threads).tolist()
            lps, tops = _logprobs(logits, seqs, ids)
            t3 = time.thread_time()
        except Exception as e:           # a bug or the kernel failing: end these, keep serving
            for seq in seqs:
                self._leave(seq)
                events.append((seq, {"finish": "error", "text": "", "error": str(e)}))
            self._post(events)
            return True
        now = time.monotonic()
        generated = 0
        for k, (seq, tid) in enumerate(zip(seqs, ids)):
            if seq.t_first is None:
                seq.t_first = now
                self.metrics.first_token(now - seq.t_submit)
            for ev in seq.advance(tid, lps[k], tops[k]):
                events.append((seq, ev))
            if seq.finish_reason is None:
                seq.last = tid
                generated += 1
            else:
                generated += tid not in seq.stop_ids
                self._leave(seq)
        cpu = {"kernel": t2 - t1, "sample": t3 - t2,
               "host": (t1 - t0) + (time.thread_time() - t3)}
        self.metrics.step(len(feeds), generated, prompt_tokens, cpu)
        self.metrics.gauges(len(self.waiting), len(self.running))
        self._post(events)
        return True

    def _retire_cancelled(self, events):
        for seq in [s for s in self.running.values() if s.cancelled]:
            self._leave(seq)
            seq.finish_reason = "cancelled"
            events.append((seq, {"finish": "cancelled", "text": ""}))

    def _leave(self, seq):
        if self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self.free.append(seq.slot)


def _logprobs(logits, seqs, ids):
    """Per row: the sampled id's log-probability and {id: logprob} of the top-k ids under the
    model's distribution (softmax of the logits, before temperature), for rows that ask."""
    lps, tops = [None] * len(seqs), [None] * len(seqs)
    rows = [k for k, s in enumerate(seqs) if s.logprobs is not None]
    if not rows:
        return lps, tops
    z = logits[rows].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    for r, k in enumerate(rows):
        lps[k] = float(z[r, ids[k]])
        n = seqs[k].logprobs
        if n:
            best = np.argsort(-z[r], kind="stable")[:n]
            tops[k] = [(int(i), float(z[r, i])) for i in best]
        else:
            tops[k] = []
    return lps, tops


def _deliver(events):
    for seq, ev in events:
        if seq.sink is not None:
            seq.sink.put_nowait((seq.index, ev))
