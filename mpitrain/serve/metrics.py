"""The service's metrics, rendered in the Prometheus text exposition format (no client library:
a few counters, gauges and histograms under one lock).

Updated by the decode thread (steps, tokens, batch sizes) and the HTTP layer (requests,
latency); read by GET /metrics.
"""
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_WINDOW = 10.0   # seconds over which tokens/s is averaged
# The decode thread's CPU time per step, in parts: the kernel's decode step (and the Decoder's
# checks around it), sampling (and log-probabilities), and the rest (admission, text, events).
CPU_PARTS = ("kernel", "sample", "host")


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, v):
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v

    def lines(self, name, labels=""):
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}'
               for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {self.sum:.6f}", f"{name}_count{brace} {self.total}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = {}                 # (endpoint, status) -> count
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.steps = 0
        self.queue_depth = 0
        self.running = 0
        self.batch = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.cpu = dict.fromkeys(CPU_PARTS, 0.0)   # decode thread CPU seconds by part
        self._recent = deque()             # (time, tokens) of recent steps, for tokens/s
        self.started = time.time()

    def request(self, endpoint, status, seconds=None):
        with self._lock:
            key = (endpoint, int(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            if seconds is not None and endpoint == "/v1/completions" and status == 200:
                self.latency.observe(seconds)

    def first_token(self, seconds):
        with self._lock:
            self.ttft.observe(seconds)

    def step(self, batch_size, new_tokens, prompt_tokens, cpu=None):
        """cpu: {part: CPU seconds} of this step, parts from CPU_PARTS."""
        now = time.monotonic()
        with self._lock:
            for part, secs in (cpu or {}).items():
                self.cpu[part] += secs
            self.steps += 1
            self.batch.observe(batch_size)
            self.tokens_generated += new_tokens
            self.prompt_tokens += prompt_tokens
            self._recent.append((now, new_tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()

    def gauges(self, queue_depth, running):
        with self._lock:
            self.queue_depth, self.running = queue_depth, running

    def tokens_per_second(self):
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - RATE_WINDOW]
        return sum(recent) / RATE_WINDOW

    def render(self) -> str:
        rate = self.tokens_per_second()
        with self._lock:
            out = ["# HELP mpitrain_requests_total HTTP requests by endpoint and status.",
                   "# TYPE mpitrain_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'mpitrain_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP mpitrain_tokens_generated_total Tokens sampled for completions.",
                    "# TYPE mpitrain_tokens_generated_total counter",
                    f"mpitrain_tokens_generated_total {self.tokens_generated}",
                    "# HELP mpitrain_prompt_tokens_total Prompt tokens fed to the model.",
                    "# TYPE mpitrain_prompt_tokens_total counter",
                    f"mpitrain_prompt_tokens_total {self.prompt_tokens}",
                    "# HELP mpitrain_decode_steps_total Batched decode steps run.",
                    "# TYPE mpitrain_decode_steps_total counter",
                    f"mpitrain_decode_steps_total {self.steps}",
                    "# HELP mpitrain_decode_cpu_seconds_total CPU time of the decode thread: "
                    "the kernel's step, sampling, and the rest of the loop.",
                    "# TYPE mpitrain_decode_cpu_seconds_total counter"]
            out += [f'mpitrain_decode_cpu_seconds_total{{part="{k}"}} {v:.6f}'
                    for k, v in self.cpu.items()]
            out += [
                    f"# HELP mpitrain_tokens_per_second Tokens generated per second over the "
                    f"last {RATE_WINDOW:g} s.",
                    "# TYPE mpitrain_tokens_per_second gauge",
                    f"mpitrain_tokens_per_second {rate:.3f}",
                    "# HELP mpitrain_queue_depth Sequences waiting for a decoder slot.",
                    "# TYPE mpitrain_queue_depth gauge",
                    f"mpitrain_queue_depth {self.queue_depth}",
                    "# HELP mpitrain_running_sequences Sequences in the running batch.",
                    "# TYPE mpitrain_running_sequences gauge",
                    f"mpitrain_running_sequences {self.running}",
                    "# HELP mpitrain_batch_size Sequences per decode step.",
                    "# TYPE mpitrain_batch_size histogram"]
            out += self.batch.lines("mpitrain_batch_size")
            out += ["# HELP mpitrain_request_latency_seconds Completion request latency "
                    "(successful requests, to the last byte).",
                    "# TYPE mpitrain_request_latency_seconds histogram"]
            out += self.latency.lines("mpitrain_request_latency_seconds")
            out += ["# HELP mpitrain_time_to_first_token_seconds From admission to the queue "
                    "to the first sampled token.",
                    "# TYPE mpitrain_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("mpitrain_time_to_first_token_seconds")
        return "\n".join(out) + "\n"
