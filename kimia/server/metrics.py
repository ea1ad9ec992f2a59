"""Prometheus text-format metrics kept in process (no client library needed).

Counters, gauges and histograms with labels, thread-safe (the batcher thread records engine figures while
the event loop records request figures). `Metrics.render()` writes exposition format 0.0.4.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = (lambda s: str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n"))
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1


class Metrics:
    """The server's metrics registry (names prefixed `kimia_`)."""

    HELP = {
        "kimia_requests_total": ("counter", "HTTP/websocket requests by route and status code"),
        "kimia_request_latency_seconds": ("histogram", "time from request arrival to the complete answer"),
        "kimia_time_to_first_token_seconds": ("histogram", "time from request arrival to the first text delta"),
        "kimia_time_to_first_audio_seconds": ("histogram", "time from request arrival to the first audio chunk"),
        "kimia_batch_size": ("histogram", "requests decoded together in one engine batch"),
        "kimia_batches_total": ("counter", "engine batches run"),
        "kimia_queue_depth": ("gauge", "requests waiting for the engine"),
        "kimia_rejected_total": ("counter", "requests refused because the queue was full"),
        "kimia_generated_tokens_total": ("counter", "generation steps decoded"),
    }

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._gauges: dict[str, dict[str, float]] = defaultdict(dict)
        self._hists: dict[str, dict[str, _Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._counters[name][_labels(labels)] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[name][_labels(labels)] = float(value)

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS, **labels: str) -> None:
        with self._lock:
            h = self._hists[name].get(_labels(labels))
            if h is None:
                h = self._hists[name][_labels(labels)] = _Histogram(buckets)
            h.observe(value)

    def render(self) -> str:
        out: list[str] = []
        with self._lock:
            names = sorted(set(self._counters) | set(self._gauges) | set(self._hists) | set(self.HELP))
            for name in names:
                kind, text = self.HELP.get(name, ("untyped", name))
                out.append(f"# HELP {name} {text}")
                out.append(f"# TYPE {name} {kind}")
                for lab, v in sorted(self._counters.get(name, {}).items()):
                    out.append(f"{name}{lab} {v:g}")
                for lab, v in sorted(self._gauges.get(name, {}).items()):
                    out.append(f"{name}{lab} {v:g}")
                for lab, h in sorted(self._hists.get(name, {}).items()):
                    inner = lab[1:-1]
                    sep = "," if inner else ""
                    for b, c in zip(h.buckets, h.counts):
                        out.append(f'{name}_bucket{{{inner}{sep}le="{b:g}"}} {c}')
                    out.append(f'{name}_bucket{{{inner}{sep}le="+Inf"}} {h.count}')
                    out.append(f"{name}_sum{lab} {h.sum:.6g}")
                    out.append(f"{name}_count{lab} {h.count}")
        return "\n".join(out) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """`{'name{labels}': value}` of an exposition text (for tests and the load bench)."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, v = line.rpartition(" ")
        values[key] = float(v) if v not in ("NaN",) else math.nan
    return values
