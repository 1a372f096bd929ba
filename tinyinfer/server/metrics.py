"""Prometheus metrics in the text exposition format (no client library needed).

Names follow llama.cpp's llama-server (``llamacpp:*``) where it has one, so existing
Grafana dashboards work; the rest are ``tinyinfer_*``.
"""

from __future__ import annotations

import threading
import time
from typing import Dict, Tuple

# request latency buckets, seconds (a Pi answers slowly: go up to 5 minutes)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _labels(d: Dict[str, str]) -> str:
    if not d:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in d.items()) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        # llama-server's counters
        self.prompt_tokens_total = 0          # prompt tokens evaluated (cache hits excluded)
        self.prompt_seconds_total = 0.0
        self.tokens_predicted_total = 0
        self.tokens_predicted_seconds_total = 0.0
        self.n_decode_total = 0               # model forward calls (prompt batches + one per generated token)
        # ours
        self.prompt_tokens_requested_total = 0   # prompt tokens of all requests (cache hits included)
        self.requests: Dict[Tuple[str, str], int] = {}          # (endpoint, code) -> count
        self.jobs: Dict[str, int] = {}                           # outcome -> count
        self.rejected_total = 0
        self.latency: Dict[str, list] = {}                       # endpoint -> bucket counts + [sum, count]

    # -- recording ------------------------------------------------------------------------
    def record_generation(self, stats, n_batch: int = 512) -> None:
        with self._lock:
            self.prompt_tokens_total += stats.prompt_evaluated
            self.prompt_seconds_total += stats.prompt_s
            self.tokens_predicted_total += stats.completion_tokens
            self.tokens_predicted_seconds_total += stats.gen_s
            self.prompt_tokens_requested_total += stats.prompt_tokens
            n_prompt_batches = -(-stats.prompt_evaluated // max(1, n_batch)) if stats.prompt_evaluated else 0
            self.n_decode_total += n_prompt_batches + max(0, stats.completion_tokens - 1)

    def record_embedding(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens_total += n_tokens
            self.prompt_tokens_requested_total += n_tokens
            self.prompt_seconds_total += seconds
            self.n_decode_total += 1

    def record_job(self, outcome: str) -> None:
        with self._lock:
            self.jobs[outcome] = self.jobs.get(outcome, 0) + 1

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected_total += 1

    def record_request(self, endpoint: str, code: int, seconds: float) -> None:
        with self._lock:
            key = (endpoint, str(code))
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.latency.get(endpoint)
            if h is None:
                h = self.latency[endpoint] = [0] * len(BUCKETS) + [0.0, 0]
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    # -- exposition -----------------------------------------------------------------------
    def render(self, processing: int, deferred: int, kv_tokens: int, kv_ratio: float, slots: int) -> str:
        out = []

        def metric(name, typ, help_, samples):
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {typ}")
            for labels, value in samples:
                out.append(f"{name}{_labels(labels)} {_fmt(value)}")

        with self._lock:
            pt, ps = self.prompt_tokens_total, self.prompt_seconds_total
            gt, gs = self.tokens_predicted_total, self.tokens_predicted_seconds_total
            metric("llamacpp:prompt_tokens_total", "counter", "Number of prompt tokens processed.", [({}, pt)])
            metric("llamacpp:prompt_seconds_total", "counter", "Prompt process time", [({}, ps)])
            metric("llamacpp:tokens_predicted_total", "counter", "Number of generation tokens processed.",
                   [({}, gt)])
            metric("llamacpp:tokens_predicted_seconds_total", "counter", "Predict process time", [({}, gs)])
            metric("llamacpp:n_decode_total", "counter", "Total number of llama_decode() calls",
                   [({}, self.n_decode_total)])
            metric("llamacpp:prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.",
                   [({}, pt / ps if ps > 0 else 0.0)])
            metric("llamacpp:predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.",
                   [({}, gt / gs if gs > 0 else 0.0)])
            metric("llamacpp:kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.",
                   [({}, kv_ratio)])
            metric("llamacpp:kv_cache_tokens", "gauge", "KV-cache tokens.", [({}, kv_tokens)])
            metric("llamacpp:requests_processing", "gauge", "Number of requests processing.", [({}, processing)])
            metric("llamacpp:requests_deferred", "gauge", "Number of requests deferred.", [({}, deferred)])
            metric("tinyinfer_slots", "gauge", "Number of generation slots (--parallel).", [({}, slots)])
            metric("tinyinfer_prompt_tokens_requested_total", "counter",
                   "Prompt tokens of all requests, KV-cache hits included.",
                   [({}, self.prompt_tokens_requested_total)])
            metric("tinyinfer_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
                   [({"endpoint": e, "code": c}, n) for (e, c), n in sorted(self.requests.items())])
            metric("tinyinfer_jobs_total", "counter",
                   "Model jobs by outcome (ok, error, cancelled = client went away, rejected = shutting down).",
                   [({"outcome": k}, v) for k, v in sorted(self.jobs.items())])
            metric("tinyinfer_requests_rejected_total", "counter", "Requests answered 503 because the queue was full.",
                   [({}, self.rejected_total)])
            name = "tinyinfer_request_duration_seconds"
            out.append(f"# HELP {name} HTTP request latency, from arrival to the last byte sent.")
            out.append(f"# TYPE {name} histogram")
            for ep, h in sorted(self.latency.items()):
                for i, b in enumerate(BUCKETS):
                    out.append(f"{name}_bucket{_labels({'endpoint': ep, 'le': _fmt(b)})} {h[i]}")
                out.append(f"{name}_bucket{_labels({'endpoint': ep, 'le': '+Inf'})} {h[-1]}")
                out.append(f"{name}_sum{_labels({'endpoint': ep})} {_fmt(h[-2])}")
                out.append(f"{name}_count{_labels({'endpoint': ep})} {h[-1]}")
            metric("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                   [({}, self.started)])
        try:
            import psutil
            metric("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                   [({}, psutil.Process().memory_info().rss)])
        except Exception:
            pass
        return "\n".join(out) + "\n"
