"""`dcfeat serve`: a run folder behind HTTP (FastAPI + uvicorn), micro-batched, bounded, stateless.

Endpoints (docs/serving.md has the request and answer formats):

* `POST /v1/locate`: one or more images (multipart parts, or one image as the raw body), query
  or form fields `k` and `min_confidence`; one answer per image (`Localizer`'s `Answer`). Or,
  with Content-Type application/json, descriptors the run's features are made of:
  `{"descriptors": [[...], ...], "ids": [...], "k": 5, "min_confidence": 0.5}`, one answer per
  row, through the same queue and batches without the backbone. A run trained on imported
  descriptors (no backbone dcfeat can load) starts without loading one and answers these only;
  an image sent to it is a 422 naming the JSON form.
* `POST /geopose` (the OSCP reference servers' path) and `POST /scrs/geopose`: the Open AR Cloud (OSCP)
  GeoPose protocol's GeoPoseReq → GeoPoseResp, version 2.0 (`Accept: application/vnd.oscp+json;
  version=2.0`; v1's requests are read too, another major version is a 400); `GET /geopose` says it runs. The
  position is the answer's, `accuracy.position` its 90 % radius. dcfeat knows no orientation and
  no height: the quaternion is the identity, `accuracy.orientation` is 180 (degrees, the largest
  angular error there is: "unknown" in a number every client can read) and `h` is 0, each said
  again in the response's `dcfeat` member. An abstention is a 404 error response, never a pose. A camera
  reading whose bytes are a JPEG, PNG, GIF, TIFF or WebP file is decoded as that file whatever its
  `imageFormat` says (the reference client labels JPEG bytes RGBA32); raw RGBA32/GRAY8 pixels otherwise.
* `GET /health`, `GET /v1/run`, `GET /v1/cells` (the class table, for the page), `GET /metrics`
  (Prometheus text format), and the page at `/` (dcfeat/static/index.html).

One worker thread owns the model. Requests decode their images in threads (at most one per
core at a time, plus one for small images; requests take turns, one image each, within a budget of
pixel memory that each image's header gives), then queue them (descriptors are queued as they come,
and count as images);
the worker takes the first waiting request and, within `max_wait_ms` of it, every other that
fits `max_batch` images, runs one forward pass for them all, and answers each. The queue holds
at most `max_queue` images: a request that would overflow it is answered 503 with Retry-After
at once. What a client can make the server hold is bounded (ServeConfig): headers by
`header_timeout_s` and `max_header_bytes` per connection (408, 431: ConnectionGuard), requests in
progress by `max_connections` (503), bodies by `max_body_bytes` each (413, from Content-Length before
it is read, or as soon as it grows past) and `max_inflight_bytes` together (503 before it is read:
BodyBudget), decoding by `max_decode_bytes` (413 from the images' headers: DecodePool). A body that does
not arrive within `timeout_s` is 408, a request the model has not answered within `timeout_s` 504.
Undecodable images, decompression bombs and bad fields are 422 naming the reason, malformed
multipart or JSON 400, a bug 500 (its traceback in the log); every error is a JSON body
`{"error": {"status", "code", "message"}}`. JSON, base64 and multipart bodies are parsed in threads:
the event loop only moves bytes, so /health answers while a 16 MB request is read.

The run folder is only read: any number of processes or replicas can serve one copy of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dcfeat import __version__
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.errors import BadInput, DcfeatError
from dcfeat.geo import utm_to_latlon
from dcfeat.images import MAX_PIXELS, ImageProblem, decode_cost
from dcfeat.localizer import Answer, Localizer, answers

# GeoPose has no way to say "orientation unknown": 180° is the largest angular error there is.
UNKNOWN_ORIENTATION_DEG = 180.0
IDENTITY_QUATERNION = {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}
# GeoPose camera readings whose bytes are raw pixels rather than an image file: bytes per pixel, PIL mode.
RAW_FORMATS = {"RGBA32": (4, "RGBA"), "GRAY8": (1, "L")}
# Latency buckets (seconds) of /metrics' histograms; batch sizes are bucketed in powers of two.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer: recorded, never sent
LOG = logging.getLogger("dcfeat.serve")


@dataclass(frozen=True)
class ServeConfig:
    """How `dcfeat serve` batches and what it refuses (every bound is an option of the command)."""

    max_batch: int = 32  # images per forward pass
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # images waiting for the model; beyond: 503
    max_images: int = 32  # images per request; beyond: 413
    max_body_bytes: int = 16 << 20  # request body; beyond: 413
    max_pixels: int = MAX_PIXELS  # decoded pixels per image; beyond: 422 (decompression bomb)
    max_k: int = 100  # cells per answer
    timeout_s: float = 30.0  # to receive the body, and again to get the model's answer
    k: int = 5  # cells per answer when the request names none
    min_confidence: float | None = None  # abstain below it when the request names none (calibrated runs)
    max_connections: int = 128  # requests in progress at once (headers received, not yet answered); beyond: 503
    header_timeout_s: float = 10.0  # to receive a request's headers; beyond: 408 and the connection closed
    max_header_bytes: int = 32 << 10  # a request's line and headers; beyond: 431 and the connection closed
    max_inflight_bytes: int = 256 << 20  # bodies of the requests in progress, together; beyond: 503
    max_decode_bytes: int = 1 << 30  # pixel memory of the images decoding at once (from their headers); beyond: 413

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_images", "max_body_bytes", "max_pixels", "max_k", "k",
                     "max_connections", "max_header_bytes", "max_inflight_bytes", "max_decode_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise BadInput(f"{name} {getattr(self, name)!r}: a positive integer is expected")
        if not (self.max_wait_ms >= 0 and self.timeout_s > 0 and self.header_timeout_s > 0):
            raise BadInput("max_wait_ms must be >= 0, timeout_s and header_timeout_s > 0")
        if self.k > self.max_k:
            raise BadInput(f"k {self.k} is more than max_k {self.max_k}")
        if self.max_inflight_bytes < self.max_body_bytes:
            raise BadInput(f"max_inflight_bytes {self.max_inflight_bytes:,} is less than max_body_bytes "
                           f"{self.max_body_bytes:,}: a body of the largest size could never be received "
                           "(dcfeat serve --max-inflight-mb, --max-body-mb)")


class Problem(Exception):
    """An HTTP error answer: its status, a short code and one message that says what to fix."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}

    def encoded(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":")).encode()


def _error(problem: Problem, extra: dict | None = None) -> JSONResponse:
    return JSONResponse({**(extra or {}), **problem.body()}, status_code=problem.status, headers=problem.headers)


def _raw_response(problem: Problem) -> bytes:
    """A Problem as a whole HTTP/1.1 response that closes the connection: what the connection guard writes
    itself, below the application."""
    body = problem.encoded()
    head = [f"HTTP/1.1 {problem.status} {HTTPStatus(problem.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close", *(f"{k}: {v}" for k, v in problem.headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _send(send, problem: Problem) -> None:
    """A Problem as an ASGI response (for the layers under FastAPI's own handlers)."""
    body = problem.encoded()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *((k.lower().encode(), str(v).encode()) for k, v in problem.headers.items())]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Metrics: the Prometheus text format, written by hand (a few counters, one gauge, histograms).

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


# ---------------------------------------------------------------------------------------------
# Bounds on what clients make the server hold: connections, request bodies, decoded pixels.

class ConnectionGuard(HttpToolsProtocol):
    """uvicorn's httptools connection with the bounds uvicorn has not: a request's line and headers must
    arrive within `header_timeout_s` of the connection (or of the first byte of a keep-alive request), or it
    is answered 408 and closed, and they may not grow past `max_header_bytes` (431). `max_connections`
    counts requests in progress, not connections: a client holding connections open without finishing its
    headers costs a socket until its deadline, never the place of a request (uvicorn's own
    limit_concurrency counts every open connection, so 130 slow sockets kept /health at 503)."""

    def __init__(self, *args, limits: ServeConfig, **kw):
        super().__init__(*args, **kw)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting = False  # between a request's first byte (or the connection's start) and its last header
        self._header_bytes = 0

    def _await_headers(self) -> None:
        self._awaiting, self._header_bytes = True, 0
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _stop_waiting(self) -> None:
        self._awaiting = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _refuse(self, problem: Problem) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            self.logger.warning("%s:%s refused: %s", *(self.client or ("?", "?")), problem.message)
            self.transport.write(_raw_response(problem))
            self.transport.close()

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._awaiting or self.transport.is_closing():
            return
        if self._header_bytes == 0:  # a connection opened and never used: closed without a word
            self.transport.close()
            return
        self._refuse(Problem(408, "header_timeout", f"the request's headers did not arrive within "
                             f"{self.limits.header_timeout_s:g} s (dcfeat serve --header-timeout)"))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._awaiting and self._header_bytes > self.limits.max_header_bytes:
            self._refuse(Problem(431, "headers_too_large", f"the request's line and headers are longer than "
                                 f"{self.limits.max_header_bytes:,} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._awaiting:  # a keep-alive connection's next request: its headers get a deadline of their own
            self._await_headers()
            self._header_bytes = 1  # begun: answered 408 if late, never closed as unused

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        if len(self.tasks) < self.limits.max_connections:
            return super().on_headers_complete()
        app, self.app = self.app, self._busy
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    async def _busy(self, scope, receive, send) -> None:
        await _send(send, Problem(503, "too_many_requests", f"{self.limits.max_connections} requests are in progress "
                                  "already; retry shortly (dcfeat serve --max-connections)", {"Retry-After": "1"}))

    def send_400_response(self, msg: str) -> None:
        self._refuse(Problem(400, "malformed_http", msg))


def uvicorn_options(config: ServeConfig) -> dict:
    """What uvicorn runs `dcfeat serve` with: connections guarded by ConnectionGuard (which counts requests
    in progress itself, in place of uvicorn's limit_concurrency)."""
    return {"http": functools.partial(ConnectionGuard, limits=config), "limit_concurrency": None}


class BodyBudget:
    """Request body bytes the server has agreed to receive and hold, across requests: a request takes its
    Content-Length (max_body_bytes when it sends none) before its body is read, and gives it back when it
    is answered; one that does not fit is answered 503 with Retry-After, unread. Each body is held a few
    times over while it is parsed (the bytes, their parts or JSON, the decoded base64), so this bounds the
    memory of bodies to about three times max_inflight_bytes, whatever the number of connections."""

    def __init__(self, config: ServeConfig, metrics: Metrics):
        self.config, self.metrics, self.used = config, metrics, 0

    def take(self, request: Request) -> int:
        length = request.headers.get("content-length")
        declared = length is not None and length.isdigit()
        if declared and int(length) > self.config.max_body_bytes:
            raise _too_large(self.config)
        n = int(length) if declared else self.config.max_body_bytes
        if self.used + n > self.config.max_inflight_bytes:
            raise Problem(503, "busy", f"the server is receiving {self.used / 2**20:,.1f} MB of other requests' "
                          f"bodies already, and {n / 2**20:,.1f} MB more would pass its {self.config.max_inflight_bytes / 2**20:,.0f} MB "
                          "(dcfeat serve --max-inflight-mb); retry shortly" + ("" if declared else
                          ": without a Content-Length a body counts as the largest allowed"), {"Retry-After": "1"})
        self.used += n
        self.metrics.body_bytes = self.used
        return n

    def give(self, n: int) -> None:
        self.used -= n
        self.metrics.body_bytes = self.used


# Images whose decoding takes at most this much pixel memory (a phone photo, JPEG-drafted to about 500x375,
# takes ~1.5 MB) have a decoding thread of their own besides the one per core, so that they never wait
# behind huge images.
SMALL_DECODE_BYTES = 8 << 20


class DecodePool:
    """Images decode in threads: at most one per core at a time plus one for small images, within
    `max_decode_bytes` of pixel memory (estimated from each image's header, `decode_cost`). Requests take
    turns, one image each, so that a request of many huge images cannot keep another's waiting until all of
    its own are done. Lives in the serving event loop (no locks): `run` is awaited there."""

    def __init__(self, slots: int, budget: int):
        self.slots, self.budget = slots, budget
        self.busy, self.small_busy, self.bytes = 0, False, 0
        self.waiting: OrderedDict[int, deque] = OrderedDict()  # request → its images' (cost, future), in turn
        self.executor = ThreadPoolExecutor(slots + 1, thread_name_prefix="dcfeat-decode")

    async def run(self, request: int, cost: int, work):
        # Others waiting go first, but a small image may take the small images' thread past them.
        lane = self._free_lane(cost) if not self.waiting or cost <= SMALL_DECODE_BYTES else None
        if lane is None:
            ready = asyncio.get_running_loop().create_future()
            self.waiting.setdefault(request, deque()).append((cost, ready))
            try:
                lane = await ready
            except asyncio.CancelledError:
                if ready.done() and not ready.cancelled():  # granted as it was cancelled: hand the lane on
                    self._release(ready.result(), cost)
                else:
                    self._forget(request, ready)
                raise
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)
        finally:
            self._release(lane, cost)

    def _free_lane(self, cost: int) -> str | None:
        if cost <= SMALL_DECODE_BYTES and not self.small_busy:
            self.small_busy = True
            self.bytes += cost
            return "small"
        if self.busy < self.slots and (self.bytes + cost <= self.budget or self.busy == 0):
            self.busy += 1
            self.bytes += cost
            return "core"
        return None

    def _release(self, lane: str, cost: int) -> None:
        if lane == "small":
            self.small_busy = False
        else:
            self.busy -= 1
        self.bytes -= cost
        self._dispatch()

    def _forget(self, request: int, ready: asyncio.Future) -> None:
        waiting = self.waiting.get(request)
        if waiting is not None:
            self.waiting[request] = deque(w for w in waiting if w[1] is not ready)
            if not self.waiting[request]:
                del self.waiting[request]

    def _dispatch(self) -> None:
        """Grant free lanes to waiting images: the requests in turn, each its next image, the turn passing on."""
        while self.waiting:
            for request, waiting in self.waiting.items():
                lane = self._free_lane(waiting[0][0])
                if lane is not None:
                    break
            else:
                return
            _, ready = waiting.popleft()
            if waiting:
                self.waiting.move_to_end(request)
            else:
                del self.waiting[request]
            ready.set_result(lane)


# ---------------------------------------------------------------------------------------------
# The worker: one thread owns the model and answers queued requests in shared forward passes.

@dataclass
class Job:
    """One request's queries: decoded images for the backbone, or descriptors (`features`) that skip it."""

    images: list[np.ndarray]
    ids: list[str]
    k: int
    min_confidence: float | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: threading.Event = field(default_factory=threading.Event)  # its request timed out or went away
    features: np.ndarray | None = None  # (n, dim) float32 descriptors, instead of images

    @property
    def size(self) -> int:
        """Queries in the job: what the queue and a batch count."""
        return len(self.features) if self.features is not None else len(self.images)


class QueueFull(Exception):
    pass


class Batcher:
    """Micro-batching: requests arriving within `max_wait_ms` of each other share one forward pass."""

    def __init__(self, localizer: Localizer, config: ServeConfig, metrics: Metrics):
        self.localizer, self.config, self.metrics = localizer, config, metrics
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # images queued, not yet taken by the worker
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.alive:
            self._thread = threading.Thread(target=self._loop, name="dcfeat-model", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self.alive:
            self._queue.put(None)
            self._thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job, or QueueFull when its images would overflow the bounded queue."""
        with self._lock:
            if self._pending + job.size > self.config.max_queue:
                raise QueueFull
            self._pending += job.size
            self.metrics.queue_depth = self._pending
        self._queue.put(job)

    def _taken(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            self.metrics.queue_depth = self._pending

    def _loop(self) -> None:
        carry = None
        while True:
            job = carry if carry is not None else self._queue.get()
            carry = None
            if job is None:
                return
            batch, n = [job], job.size
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while n < self.config.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                if n + nxt.size > self.config.max_batch:
                    carry = nxt  # the next batch's first
                    break
                batch.append(nxt)
                n += nxt.size
            self._taken(n)
            self._answer([j for j in batch if not j.abandoned.is_set()])

    def _answer(self, batch: list[Job]) -> None:
        if not batch:
            return
        start = time.perf_counter()
        try:
            feats = self._features(batch)
            offsets = np.cumsum([0] + [job.size for job in batch])
            results = {}
            for k in sorted({job.k for job in batch}):  # one classifier pass per k asked in the batch
                rows = [i for i, job in enumerate(batch) if job.k == k]
                index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in rows])
                ids = [f"{i}:{j}" for i in rows for j in range(batch[i].size)]
                found = answers(self.localizer.table(feats[index], ids, k=k))
                for i in rows:
                    results[i] = found[:batch[i].size]
                    found = found[batch[i].size:]
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure, the worker goes on
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, e)
            return
        seconds = time.perf_counter() - start
        with self.metrics.lock:
            self.metrics.batch_sizes.observe(len(feats))
            self.metrics.forward.observe(seconds)
        for i, job in enumerate(batch):
            own = [_renamed(a, name, job.min_confidence) for a, name in zip(results[i], job.ids)]
            job.loop.call_soon_threadsafe(_settle, job.future, own, None)

    def _features(self, batch: list[Job]) -> np.ndarray:
        """The batch's features in job order: its images through the backbone (one forward pass per
        max_batch of them), its descriptors as they came."""
        images = [im for job in batch if job.features is None for im in job.images]
        embedded = (np.concatenate([self.localizer.embed(images[s:s + self.config.max_batch])
                                    for s in range(0, len(images), self.config.max_batch)]) if images else None)
        parts, at = [], 0
        for job in batch:
            if job.features is not None:
                parts.append(job.features)
            else:
                parts.append(embedded[at:at + len(job.images)])
                at += len(job.images)
        return np.concatenate(parts)


def _renamed(answer: Answer, image_id: str, min_confidence: float | None) -> Answer:
    """An answer of a batch under its request's own image name and abstention threshold."""
    abstained = min_confidence is not None and answer.confidence is not None and answer.confidence < min_confidence
    return replace(answer, image_id=image_id, abstained=abstained)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---------------------------------------------------------------------------------------------
# Requests: reading bounded bodies, decoding images, checking fields.

def _too_large(config: ServeConfig) -> Problem:
    return Problem(413, "body_too_large", f"the request body is larger than {config.max_body_bytes:,} bytes; "
                   "send smaller images or fewer per request (dcfeat serve --max-body-mb)")


async def read_body(request: Request, config: ServeConfig, started: float) -> bytes:
    """The whole body, refused with 413 as soon as it grows past max_body_bytes (one that says so in its
    Content-Length is refused unread, by BodyBudget.take) and with 408 when it has not arrived within
    timeout_s of the request's start."""
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        remaining = config.timeout_s - (time.monotonic() - started)
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(remaining, 0.001))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise Problem(408, "body_timeout", f"the request body did not arrive within {config.timeout_s:g} s; "
                          "send it faster, or smaller") from None
        size += len(chunk)
        if size > config.max_body_bytes:
            raise _too_large(config)
        chunks.append(chunk)
    return b"".join(chunks)


def _number(name: str, value, kind):
    if value is None or value == "":
        return None
    try:
        v = kind(value)
    except (TypeError, ValueError):
        raise Problem(422, "bad_field", f"{name}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    if isinstance(v, float) and not math.isfinite(v):
        raise Problem(422, "bad_field", f"{name}={value!r}: expected a finite number")
    return v


def request_options(fields: dict, localizer: Localizer, config: ServeConfig) -> tuple[int, float | None]:
    """(k, min_confidence) from query or form fields, range-checked (422 naming the field)."""
    k = _number("k", fields.get("k"), int)
    k = config.k if k is None else k
    if not 1 <= k <= config.max_k:
        raise Problem(422, "bad_field", f"k={k}: cells per answer must be from 1 to {config.max_k} (the run has "
                      f"{localizer.classes} classes; dcfeat serve --max-k)")
    p = _number("min_confidence", fields.get("min_confidence"), float)
    p = config.min_confidence if p is None else p
    if p is not None and not 0 < p <= 1:
        raise Problem(422, "bad_field", f"min_confidence={p:g}: a probability in (0, 1] is expected")
    if p is not None and localizer.scoring_note:
        raise Problem(422, "uncalibrated_run", f"min_confidence needs a confidence, and {localizer.scoring_note}")
    if p is not None and not localizer.calibrated:
        raise Problem(422, "uncalibrated_run", "min_confidence needs a calibrated run, and this server's run has no "
                      "calibration.json: leave min_confidence out, or serve a run fitted with `dcfeat calibrate`")
    return k, p


MAX_FIELDS, MAX_FIELD_BYTES = 32, 64 << 10  # the text fields of a multipart body (k, min_confidence, …)


def multipart_images(body: bytes, content_type: str, config: ServeConfig) -> tuple[list[tuple[str, bytes]], dict]:
    """([(name, bytes)] of every file part in order, {field: value} of the text parts) of a multipart/form-data
    body; 400 unless it is whole, valid multipart up to its closing boundary (a part cut short is never
    dropped in silence), 413 past max_images. Called in a thread: parsing 16 MB keeps a core busy a while."""

    def bad(why: str) -> Problem:
        return Problem(400, "malformed_multipart", f"the multipart body cannot be parsed: {why}")

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise bad("its Content-Type names no boundary (multipart/form-data; boundary=...)")
    parts, fields, part, header = [], {}, {}, [b"", b""]

    def on_part_begin():
        part.clear()
        part.update(headers={}, chunks=[], size=0, name="", file=False)

    def on_header_field(data, start, end):
        header[0] += data[start:end]

    def on_header_value(data, start, end):
        header[1] += data[start:end]

    def on_header_end():
        part["headers"][header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def on_headers_finished():
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["file"] = b"filename" in disposition
        part["name"] = (disposition.get(b"filename") or disposition.get(b"name") or b"").decode("utf-8", "replace")
        if part["file"] and len(parts) >= config.max_images:
            raise Problem(413, "too_many_images", f"more than {config.max_images} images in one request, at most "
                          f"{config.max_images}; send them in several (dcfeat serve --max-images)")
        if not part["file"] and len(fields) >= MAX_FIELDS:
            raise bad(f"more than {MAX_FIELDS} text fields")

    def on_part_data(data, start, end):
        part["chunks"].append(data[start:end])
        part["size"] += end - start
        if not part["file"] and part["size"] > MAX_FIELD_BYTES:
            raise bad(f"the text field {part['name']!r} is longer than {MAX_FIELD_BYTES:,} bytes")

    def on_part_end():
        data = b"".join(part["chunks"])
        if part["file"]:
            parts.append((part["name"], data))
        else:
            fields[part["name"]] = data.decode("utf-8", "replace")

    callbacks = {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
                 "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished}
    parser = MultipartParser(boundary, callbacks)
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise bad(str(e)) from None
    if parser.state != MultipartState.END:
        raise bad(f"it ends before its closing boundary --{boundary.decode('latin-1')}--, after {len(parts)} "
                  "whole part(s): truncated, or never closed")
    return parts, fields


async def decode_all(localizer: Localizer, parts: list[tuple[str, bytes | Image.Image]], config: ServeConfig,
                     pool: DecodePool, request: int) -> list[np.ndarray]:
    """Every image decoded in the pool's threads (`request` takes its turns there), once the pixel memory
    their headers say they take is checked against max_decode_bytes, each and together (413 before any is
    decoded); 422 naming each that cannot be decoded."""
    costs = await asyncio.gather(*(asyncio.to_thread(decode_cost, data, localizer.image_size, localizer.crop)
                                   for _, data in parts))
    budget = f"{config.max_decode_bytes / 2**20:,.0f} MB"
    over = [f"{name}: {what}, {cost / 2**20:,.0f} MB" for (name, _), (cost, what) in zip(parts, costs)
            if cost > config.max_decode_bytes]
    if over:
        raise Problem(413, "decode_budget", f"{len(over)} of {len(parts)} images would take more pixel memory to "
                      f"decode than this server gives all decoding at once ({budget}): " + "; ".join(over)
                      + ". Send them smaller (dcfeat serve --max-decode-mb)")
    total = sum(cost for cost, _ in costs)
    if total > config.max_decode_bytes:
        raise Problem(413, "decode_budget", f"the {len(parts)} images together would take {total / 2**20:,.0f} MB "
                      f"of pixel memory to decode, more than this server gives all decoding at once ({budget}); "
                      "send them in several requests (dcfeat serve --max-decode-mb)")

    def decode(data):
        if isinstance(data, bytes) and not data:
            raise ImageProblem("empty: 0 bytes")
        return localizer.decode(data, max_pixels=config.max_pixels)

    async def one(data, cost: int):
        try:
            return await pool.run(request, cost, functools.partial(decode, data))
        except ImageProblem as e:
            return e

    decoded = await asyncio.gather(*(one(data, cost) for (_, data), (cost, _) in zip(parts, costs)))
    bad = [f"{name}: {d}" for (name, _), d in zip(parts, decoded) if isinstance(d, ImageProblem)]
    if bad:
        raise Problem(422, "undecodable_image", f"{len(bad)} of {len(parts)} images cannot be used: "
                      + "; ".join(bad) + ". Send JPEG, PNG, WebP, TIFF or BMP files that open, each under "
                      f"{config.max_pixels:,} pixels")
    return decoded


def parse_json(body: bytes, form: str):
    """The body's JSON; 400 naming `form` (what to send) when it is not JSON or is nested too deeply to read."""
    try:
        return json.loads(body)
    except RecursionError:
        raise Problem(400, "malformed_json", f"the body's JSON is nested too deeply to read; send {form}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, "malformed_json", f"the body is not JSON ({e}); send {form}") from None


DESCRIPTOR_FIELDS = ("descriptors", "ids", "k", "min_confidence")


def descriptor_request(body: bytes, localizer: Localizer, config: ServeConfig) -> tuple[np.ndarray, list[str], dict]:
    """(descriptors (n, dim) float32, their ids, the k / min_confidence fields as text) of a JSON body
    `{"descriptors": [[...], ...], "ids": [...], "k": 5, "min_confidence": 0.5}`: 400 when it is not
    JSON, 413 past max_images descriptors, 422 naming what is wrong with it. Called in a thread: reading
    32 rows of 1,024 numbers as JSON keeps a core busy a while."""
    dim = localizer.dim
    form = f'{{"descriptors": [[...{dim} numbers], ...], "ids": [...], "k": 5, "min_confidence": 0.5}}'

    def bad(message: str, code: str = "bad_descriptors") -> Problem:
        return Problem(422, code, f"{message}; send {form} (ids, k and min_confidence optional)")

    doc = parse_json(body, form)
    if not isinstance(doc, dict) or "descriptors" not in doc:
        raise bad("expected a JSON object with `descriptors`")
    unknown = sorted(set(doc) - set(DESCRIPTOR_FIELDS))
    if unknown:
        raise bad(f"unknown fields {unknown}")
    if doc["descriptors"] == []:
        raise bad("no descriptor in the request", "no_descriptor")
    try:
        values = np.asarray(doc["descriptors"])
    except ValueError:  # rows of different lengths
        raise bad("`descriptors` rows of different lengths") from None
    if values.ndim != 2 or values.dtype.kind not in "iuf":
        raise bad(f"`descriptors` must be a list of lists of numbers (shape (n, {dim})), not of shape {values.shape} "
                  f"and type {values.dtype}")
    if len(values) > config.max_images:
        raise Problem(413, "too_many_descriptors", f"{len(values)} descriptors in one request, at most "
                      f"{config.max_images}; send them in several (dcfeat serve --max-images)")
    if values.shape[1] != dim:
        raise bad(f"descriptors of {values.shape[1]} values; this run's features have {dim}", "wrong_dim")
    with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
        values = values.astype(np.float32)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        raise bad(f"descriptors {np.flatnonzero(~finite)[:5].tolist()} hold values that are not finite (NaN or "
                  "infinity, or beyond float32)")
    ids = doc.get("ids")
    if ids is None:
        ids = [f"#{i}" for i in range(len(values))]
    elif not (isinstance(ids, list) and len(ids) == len(values) and all(isinstance(i, str) for i in ids)):
        raise bad(f"`ids` must be a list of {len(values)} strings, one per descriptor")
    fields = {name: str(doc[name]) for name in ("k", "min_confidence") if doc.get(name) is not None}
    return values, ids, fields


# File signatures of the encoded images a camera reading may hold, whatever its imageFormat says (the OSCP
# reference client labels the bytes of a JPEG file RGBA32): what starts so is decoded as the file it is.
ENCODED_IMAGES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def encoded_image(data: bytes) -> bool:
    """Whether `data` starts as a JPEG, PNG, GIF, TIFF or WebP file does."""
    return data.startswith(ENCODED_IMAGES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def geopose_image(doc) -> tuple[bytes | Image.Image, str]:
    """(the image: an encoded file's bytes, or raw pixels as a PIL image; what it is) of a GeoPoseReq's first
    camera reading; 422 naming the field. Bytes that are an encoded image are decoded as one whatever
    `imageFormat` says; raw formats (RAW_FORMATS) are read as raw pixels of `size` only when they are not.
    Called in a thread: a 16 MB body holds 12 MB of base64."""
    def bad(message: str) -> Problem:
        return Problem(422, "bad_geopose", f"GeoPoseReq: {message}")

    if not isinstance(doc, dict):
        raise bad("expected a JSON object with id, timestamp, type, sensors and sensorReadings")
    if not isinstance(doc.get("id"), str) or not doc["id"]:
        raise bad("`id` must be a non-empty string")
    if doc.get("type", "geopose") != "geopose":
        raise bad(f"`type` is {doc.get('type')!r}; this service answers type \"geopose\"")
    if "timestamp" in doc and not (isinstance(doc["timestamp"], (int, float)) and not isinstance(doc["timestamp"], bool)):
        raise bad("`timestamp` must be a number (milliseconds since the Unix epoch)")
    readings = doc.get("sensorReadings")
    if isinstance(readings, dict):  # protocol v2: {cameraReadings: [...], geolocationReadings: [...], ...}
        cameras = readings.get("cameraReadings") or []
    elif isinstance(readings, list):  # protocol v1: [{sensorId, timestamp, reading: {imageBytes, ...}}]
        cameras = [r.get("reading") for r in readings if isinstance(r, dict) and isinstance(r.get("reading"), dict)]
    else:
        raise bad("`sensorReadings` missing: an object with `cameraReadings` (or a list of sensor readings)")
    if not isinstance(cameras, list):
        raise bad("`sensorReadings.cameraReadings` must be a list")
    camera = next((c for c in cameras if isinstance(c, dict) and c.get("imageBytes")), None)
    if camera is None:
        raise bad("no camera reading with `imageBytes` (the base64 image) in `sensorReadings`")
    if not isinstance(camera["imageBytes"], str):
        raise bad("`imageBytes` must be a base64 string")
    text = camera["imageBytes"].split(",", 1)[-1] if camera["imageBytes"].startswith("data:") else camera["imageBytes"]
    try:
        data = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise bad("`imageBytes` is not valid base64") from None
    fmt = str(camera.get("imageFormat") or "")
    if fmt.upper() in RAW_FORMATS and not encoded_image(data):  # raw pixels: width × height × bytes per pixel
        depth, mode = RAW_FORMATS[fmt.upper()]
        size = camera.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise bad(f"imageFormat {fmt} needs `size` [width, height]")
        if len(data) != size[0] * size[1] * depth:
            raise bad(f"imageFormat {fmt} of size {size} needs {size[0] * size[1] * depth:,} bytes, got {len(data):,} "
                      "(and they are not a JPEG, PNG, GIF, TIFF or WebP file either)")
        return Image.frombytes(mode, tuple(size), data), f"camera reading ({fmt})"
    return data, "camera reading"


GEOPOSE_MEDIA, GEOPOSE_VERSION = "application/vnd.oscp+json", "2.0"
_ACCEPT_VERSION = re.compile(r"application/vnd\.oscp\+json\s*(?:;[^,]*?\bversion\s*=\s*\"?(\d+)(?:\.(\d+))?)?", re.I)


def geopose_version(accept: str) -> str | None:
    """The GeoPose protocol version an Accept header asks for ("2.0"; None when it names no OSCP media type,
    and 2.0 is answered as plain JSON); 400 naming 2.0 for a major version other than 2 or 1 (whose
    requests this server reads too, and whose GeoPoseResp is the same)."""
    found = _ACCEPT_VERSION.search(accept)
    if found is None:
        return None
    major, minor = found.group(1), found.group(2) or "0"
    if major is None:
        return GEOPOSE_VERSION
    if major not in ("1", "2"):
        raise Problem(400, "unsupported_version", f"the request asks for GeoPose protocol version {major}.{minor} "
                      f"(Accept: {accept}); this server speaks version {GEOPOSE_VERSION} (and reads 1.x requests): "
                      f"send Accept: {GEOPOSE_MEDIA}; version={GEOPOSE_VERSION}")
    return f"{major}.{minor}"


def geopose_response(request_id: str, answer: Answer) -> dict:
    """The GeoPoseResp of an answer (see the module docstring for what dcfeat cannot know)."""
    return {"id": request_id, "timestamp": int(time.time() * 1000), "type": "geopose",
            "accuracy": {"position": answer.radius_m, "orientation": UNKNOWN_ORIENTATION_DEG},
            "geopose": {"position": {"lat": answer.lat, "lon": answer.lon, "h": 0.0}, "quaternion": IDENTITY_QUATERNION},
            "dcfeat": {"orientation": "unknown: the quaternion is the identity and accuracy.orientation 180",
                       "height": "unknown: h is 0", "accuracy_position": "radius (m) holding the true horizontal "
                       "position with probability 0.9", "confidence": answer.confidence,
                       "threshold_m": answer.threshold_m, "utm": answer.to_dict()["utm"], "top_k": answer.top_k,
                       "run_status": answer.run_status}}


# ---------------------------------------------------------------------------------------------
# The application.

def run_info(localizer: Localizer, config: ServeConfig) -> dict:
    run = localizer.run
    features, cal = run.feature_identity, run.calibration
    return {"dcfeat": __version__, "run": Path(run.directory).resolve().name, "status": localizer.status,
            "complete": run.complete, "epochs_done": run.epochs_done, "epochs": run.epochs,
            "backbone": {"model": features.get("model"), "fingerprint": features.get("model_fingerprint"),
                         "random": run.random_backbone, "pooling": features.get("pooling"),
                         "image_size": features.get("image_size"), "crop": features.get("crop")},
            "accepts": {"images": localizer.embeds_images, "descriptors": localizer.dim},
            "notice": RANDOM_NOTICE if run.random_backbone else None,
            "preset": run.config.train.preset, "M": run.M, "N": run.config.train.N, "classes": localizer.classes,
            "scoring": localizer.scoring,
            "calibration": None if cal is None else {"threshold_m": cal.threshold_m, "fitted_on": cal.fitted_on},
            "limits": asdict(config)}


def cells(localizer: Localizer) -> dict:
    """The class table in a local metric frame (metres east and north of the cells' mean position,
    an equirectangular projection of lat/lon, right across UTM zones), for drawing without map tiles."""
    classes = localizer.run.classes
    lat, lon = utm_to_latlon(classes["cell_east"].to_numpy(), classes["cell_north"].to_numpy(),
                             classes["utm_zone"].to_numpy(), classes["utm_letter"].to_numpy())
    lat0, lon0 = float(np.mean(lat)), float(np.mean(lon))
    x = (lon - lon0) * 111_320.0 * math.cos(math.radians(lat0))
    y = (lat - lat0) * 110_574.0
    return {"origin": {"lat": lat0, "lon": lon0}, "M": localizer.run.M, "classes": classes.height,
            "x": np.round(x, 1).tolist(), "y": np.round(y, 1).tolist(), "images": classes["images"].to_list()}


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


class ErrorMiddleware:
    """An exception no handler expected (a bug) becomes a JSON 500 naming where to look, its traceback in the
    server's log; under MetricsMiddleware, which counts it as the 500 it is."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = {"yes": False}

        async def sending(message):
            started["yes"] = started["yes"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:  # noqa: BLE001 - answered here, logged with its traceback
            LOG.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started["yes"]:  # the answer is half sent: the connection is all there is left to close
                raise
            await _send(send, Problem(500, "internal_error", f"the server failed on this request ({type(e).__name__}); "
                                      "its traceback is in the server log. Please report it"))


def create_app(localizer: Localizer, config: ServeConfig | None = None) -> FastAPI:
    """The service of one loaded run (the worker thread starts with the app's lifespan)."""
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(localizer, config, metrics)
    bodies = BodyBudget(config, metrics)
    pool = DecodePool(max(1, os.cpu_count() or 1), config.max_decode_bytes)
    requests = itertools.count()  # each request's turn in the decoding pool
    page = resources.files("dcfeat").joinpath("static/index.html").read_text(encoding="utf-8")
    cell_table = cells(localizer)

    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()
        pool.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dcfeat", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None)

    @app.exception_handler(Problem)
    async def problem(request: Request, e: Problem):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error(Problem(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}"))

    async def locate_images(parts: list[tuple[str, bytes]], k: int, min_confidence: float | None,
                            started: float) -> list[Answer]:
        if not parts:
            raise Problem(422, "no_image", "no image in the request: send image files as multipart parts, or one "
                          "image as the raw body (Content-Type image/jpeg, image/png, …)")
        if len(parts) > config.max_images:
            raise Problem(413, "too_many_images", f"{len(parts)} images in one request, at most {config.max_images}; "
                          "send them in several (dcfeat serve --max-images)")
        if not localizer.embeds_images:
            raise Problem(422, "no_backbone", f"this server's run was trained on descriptors that no dcfeat backbone "
                          f"made ({localizer.run.feature_identity.get('model')}), so it cannot embed images: send "
                          "the images' descriptors instead, as a JSON body (Content-Type application/json) "
                          f'{{"descriptors": [[...{localizer.dim} numbers], ...], "ids": [...], "k": 5}}')
        if not batcher.alive:
            raise Problem(503, "worker_down", "the model's worker thread is not running; restart the server")
        arrays = await decode_all(localizer, parts, config, pool, next(requests))
        loop = asyncio.get_running_loop()
        return await answered(Job(arrays, [name for name, _ in parts], k, min_confidence, loop.create_future(), loop),
                              started)

    async def locate_descriptors(body: bytes, query: dict, started: float) -> list[Answer]:
        features, ids, fields = await asyncio.to_thread(descriptor_request, body, localizer, config)
        k, min_confidence = request_options({**fields, **query}, localizer, config)
        if not batcher.alive:
            raise Problem(503, "worker_down", "the model's worker thread is not running; restart the server")
        loop = asyncio.get_running_loop()
        return await answered(Job([], ids, k, min_confidence, loop.create_future(), loop, features=features), started)

    async def answered(job: Job, started: float) -> list[Answer]:
        """Queue a job and wait for its answers: 503 when the queue is full, 504 past the timeout."""
        try:
            batcher.submit(job)
        except QueueFull:
            raise Problem(503, "queue_full", f"{config.max_queue} queries are waiting for the model already; retry "
                          "shortly", headers={"Retry-After": "1"}) from None
        try:
            found = await asyncio.wait_for(asyncio.shield(job.future),
                                           timeout=max(0.001, config.timeout_s - (time.monotonic() - started)))
        except asyncio.TimeoutError:
            job.abandoned.set()
            raise Problem(504, "model_timeout", f"no answer from the model within {config.timeout_s:g} s; the "
                          "server is overloaded, retry later or with fewer images") from None
        except asyncio.CancelledError:
            job.abandoned.set()
            raise
        with metrics.lock:
            metrics.images += len(found)
            metrics.abstained += sum(a.abstained for a in found)
        return found

    async def guarded(request: Request, handle, wrap=None):
        """Run a POST handler within the body budget (its body's share taken before it is read, given back
        once it is answered): a Problem becomes its JSON error, a client gone away a recorded 499."""
        started, held = time.monotonic(), 0
        try:
            held = bodies.take(request)
            return await handle(started)
        except Problem as e:
            return _error(e, wrap(e) if wrap else None)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        except DcfeatError as e:
            return _error(Problem(422, "bad_request", str(e)), wrap and wrap(None))
        finally:
            bodies.give(held)

    @app.post("/v1/locate")
    async def locate(request: Request):
        async def handle(started: float):
            body = await read_body(request, config, started)
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            fields = dict(request.query_params)
            if ctype == "application/json":
                found = await locate_descriptors(body, fields, started)
            else:
                if ctype == "multipart/form-data":
                    parts, form_fields = await asyncio.to_thread(multipart_images, body,
                                                                 request.headers.get("content-type", ""), config)
                    del body  # its parts are all that is needed now
                    fields = {**form_fields, **fields}
                else:
                    parts = [("body", body)] if body else []
                k, min_confidence = request_options(fields, localizer, config)
                found = await locate_images(parts, k, min_confidence, started)
            return JSONResponse({"run_status": localizer.status, "random_backbone": localizer.random_backbone,
                                 "notice": RANDOM_NOTICE if localizer.random_backbone else None,
                                 "answers": [a.to_dict() for a in found]})

        return await guarded(request, handle)

    @app.post("/scrs/geopose")
    @app.post("/geopose")  # the path of the OSCP reference servers, which their reference client posts to
    async def geopose(request: Request):
        request_id = {"id": None}

        def wrap(_):
            return {"id": request_id["id"], "timestamp": int(time.time() * 1000), "type": "geopose"}

        async def handle(started: float):
            body = await read_body(request, config, started)
            doc = await asyncio.to_thread(parse_json, body, "a GeoPoseReq")
            del body  # its JSON is all that is needed now: each copy of a body is held no longer than it is used
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                request_id["id"] = doc["id"]
            version = geopose_version(request.headers.get("accept", ""))
            data, what = await asyncio.to_thread(geopose_image, doc)
            del doc  # its base64 text: the image is all that is needed now (a waiting request holds only that)
            if localizer.scoring_note:
                raise Problem(501, "uncalibrated_run", f"GeoPose answers need an accuracy, and {localizer.scoring_note}")
            if not localizer.calibrated:
                raise Problem(501, "uncalibrated_run", "GeoPose answers need an accuracy, and this server's run has "
                              "no calibration.json: fit one with `dcfeat calibrate --run RUN --split val`")
            _, min_confidence = request_options(dict(request.query_params), localizer, config)
            [answer] = await locate_images([(what, data)], config.k, min_confidence, started)
            if answer.abstained:
                raise Problem(404, "abstained", f"no pose: the answer's confidence {answer.confidence:.3f} is below "
                              f"min_confidence {min_confidence:g} (the probability that it lies within "
                              f"{answer.threshold_m:g} m)")
            media = f"{GEOPOSE_MEDIA}; version={version}" if version else "application/json"
            return JSONResponse(geopose_response(request_id["id"], answer), media_type=media)

        return await guarded(request, handle, wrap)

    @app.get("/geopose")
    async def geopose_status():
        return {"status": "running" if batcher.alive else "worker down", "protocol": GEOPOSE_VERSION,
                "paths": ["/geopose", "/scrs/geopose"]}

    @app.get("/health")
    async def health():
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "worker down", "queue_images": metrics.queue_depth},
                            status_code=200 if ok else 503)

    @app.get("/v1/run")
    async def run():
        return run_info(localizer, config)

    @app.get("/v1/cells")
    async def cell_list():
        return cell_table

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    endpoints = {"/v1/locate", "/scrs/geopose", "/geopose", "/health", "/v1/run", "/v1/cells", "/metrics", "/"}
    app.add_middleware(ErrorMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=endpoints)  # added last: the outer one
    return app


# ---------------------------------------------------------------------------------------------
# Running it.

CONFIG_ENV = "DCFEAT_SERVE"  # the worker processes' settings, as JSON (uvicorn --workers imports the factory)


def default_threads() -> int:
    """torch's intra-op threads for the model: half the cores, the rest decoding and answering HTTP. On this
    2-core CPU one thread runs a batch 4-40× faster than two when the cores are busy (OpenMP threads
    spinning against the decoders)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or default_threads())


def app_from_env() -> FastAPI:
    """The app of one worker process of `dcfeat serve --workers N` (settings from the environment)."""
    settings = json.loads(os.environ[CONFIG_ENV])
    _set_threads(settings.get("threads"))
    localizer = Localizer.from_run(settings["run"], device=settings["device"], scoring=settings["scoring"],
                                   model=settings["model"])
    localizer.load_backbone()  # load and check it before the first request
    return create_app(localizer, ServeConfig(**settings["config"]))


def serve_run(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
              scoring: str = "cosine", model: str | None = None, config: ServeConfig | None = None,
              workers: int = 1, threads: int | None = None, log_level: str = "info") -> None:
    """`dcfeat serve`: load the run and its backbone (refusing a damaged run before listening), then
    serve it with uvicorn until interrupted; `workers` > 1 runs that many processes on one port. `model`:
    another copy of the run's backbone (the Localizer's)."""
    import uvicorn

    config = config or ServeConfig()
    _set_threads(threads)
    localizer = Localizer.from_run(run_dir, device=device, scoring=scoring, model=model)
    localizer.load_backbone()
    if config.min_confidence is not None:
        localizer.check_min_confidence(config.min_confidence)
    options = {"host": host, "port": port, "log_level": log_level, "timeout_graceful_shutdown": 5,
               **uvicorn_options(config)}
    if workers == 1:
        uvicorn.run(create_app(localizer, config), **options)
        return
    del localizer
    os.environ[CONFIG_ENV] = json.dumps({"run": str(Path(run_dir).resolve()), "device": device, "scoring": scoring,
                                         "model": model, "threads": threads, "config": asdict(config)})
    uvicorn.run("dcfeat.serve:app_from_env", factory=True, workers=workers, **options)
