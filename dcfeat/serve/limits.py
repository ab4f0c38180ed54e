"""What a client can make `dcfeat serve` hold, and what enforces it: `ServeConfig` (every bound, each an option
of the command); `ConnectionGuard` (a request's headers: their time and size; requests in progress) and the
uvicorn options it runs under; `BodyBudget` (request bodies together) and `read_body` (one body: its size
and time). Decoding's pixel memory is bounded by `dcfeat.serve.decoding`."""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass

from fastapi import Request
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from dcfeat.errors import BadInput
from dcfeat.images import MAX_PIXELS
from dcfeat.serve.metrics import Metrics
from dcfeat.serve.problems import Problem, raw_response, send_problem


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
            self.transport.write(raw_response(problem))
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
        await send_problem(send, Problem(503, "too_many_requests", f"{self.limits.max_connections} requests are in progress "
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
            raise too_large(self.config)
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


def too_large(config: ServeConfig) -> Problem:
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
            raise too_large(config)
        chunks.append(chunk)
    return b"".join(chunks)
