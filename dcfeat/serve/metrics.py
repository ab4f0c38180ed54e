"""What `dcfeat serve`'s /metrics shows: the Prometheus text format, written by hand (a few counters, two
gauges, histograms), and `MetricsMiddleware`, which counts and times every request by endpoint and status."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

# Latency buckets (seconds) of /metrics' histograms; batch sizes are bucketed in powers of two.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer: recorded, never sent


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep, own = ("," if labels else ""), (f"{{{labels}}}" if labels else "")
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return [*out, f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}', f"{name}_sum{own} {self.sum:.6f}",
                f"{name}_count{own} {self.count}"]


@dataclass
class Metrics:
    """What /metrics shows, updated under one lock by the request handlers and the worker."""

    requests: dict = field(default_factory=dict)  # (endpoint, status) → count
    latency: dict = field(default_factory=dict)  # endpoint → Histogram of seconds
    batch_sizes: Histogram = field(default_factory=lambda: Histogram(tuple(2.0 ** i for i in range(11))))
    forward: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    images: int = 0
    abstained: int = 0
    queue_depth: int = 0  # images waiting for the model
    body_bytes: int = 0  # request body bytes the server has agreed to receive and hold (BodyBudget)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def text(self) -> str:
        with self.lock:
            lines = ["# HELP dcfeat_requests_total HTTP requests answered, by endpoint and status.",
                     "# TYPE dcfeat_requests_total counter"]
            lines += [f'dcfeat_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP dcfeat_request_seconds Time from a request's arrival to its answer.",
                      "# TYPE dcfeat_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                lines += h.lines("dcfeat_request_seconds", f'endpoint="{e}"')
            lines += ["# HELP dcfeat_batch_images Images per forward pass.", "# TYPE dcfeat_batch_images histogram",
                      *self.batch_sizes.lines("dcfeat_batch_images"),
                      "# HELP dcfeat_forward_seconds Seconds per batch: backbone, classifier and confidence.",
                      "# TYPE dcfeat_forward_seconds histogram", *self.forward.lines("dcfeat_forward_seconds"),
                      "# HELP dcfeat_queue_images Images waiting for the model.", "# TYPE dcfeat_queue_images gauge",
                      f"dcfeat_queue_images {self.queue_depth}",
                      "# HELP dcfeat_body_bytes Request body bytes being received or answered.",
                      "# TYPE dcfeat_body_bytes gauge", f"dcfeat_body_bytes {self.body_bytes}",
                      "# HELP dcfeat_images_total Images answered.", "# TYPE dcfeat_images_total counter",
                      f"dcfeat_images_total {self.images}",
                      "# HELP dcfeat_abstained_total Answers below min_confidence.",
                      "# TYPE dcfeat_abstained_total counter", f"dcfeat_abstained_total {self.abstained}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts every request by endpoint and status and times it (the outermost layer: refusals too)."""

    def __init__(self, app, metrics: Metrics, endpoints: set[str]):
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": CLIENT_CLOSED}
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.request(endpoint, status["code"], time.perf_counter() - start)
