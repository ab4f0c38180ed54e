"""`dcfeat serve`: a run folder behind HTTP (FastAPI + uvicorn), micro-batched, bounded, stateless.

Endpoints (docs/serving.md has the request and answer formats):

* `POST /v1/locate`: one or more images (multipart parts, or one image as the raw body), query
  or form fields `k` and `min_confidence`; one answer per image (`Localizer`'s `Answer`). Or,
  with Content-Type application/json, descriptors the run's features are made of:
  `{"descriptors": [[...], ...], "ids": [...], "k": 5, "min_confidence": 0.5}`, one answer per
  row, through the same queue and batches without the backbone. A run trained on imported
  descriptors (no backbone dcfeat can load) starts without loading one and answers these only;
  an image sent to it is a 422 naming the JSON form.
* `POST /scrs/geopose`: the Open AR Cloud (OSCP) GeoPose protocol's GeoPoseReq → GeoPoseResp. The
  position is the answer's, `accuracy.position` its 90 % radius. dcfeat knows no orientation and
  no height: the quaternion is the identity, `accuracy.orientation` is 180 (degrees, the largest
  angular error there is: "unknown" in a number every client can read) and `h` is 0, each said
  again in the response's `dcfeat` member. An abstention is a 404 error response, never a pose.
* `GET /health`, `GET /v1/run`, `GET /v1/cells` (the class table, for the page), `GET /metrics`
  (Prometheus text format), and the page at `/` (dcfeat/static/index.html).

One worker thread owns the model. Requests decode their images in threads (at most one per
core at a time), then queue them (descriptors are queued as they come, and count as images);
the worker takes the first waiting request and, within `max_wait_ms` of it, every other that
fits `max_batch` images, runs one forward pass for them all, and answers each. The queue holds
at most `max_queue` images: a request that would overflow it is answered 503 with Retry-After
at once. A body over `max_body_bytes` is answered 413 (from
Content-Length, before it is read, or as soon as it grows past), a body that does not arrive
within `timeout_s` 408, and a request the model has not answered within `timeout_s` 504.
Undecodable images, decompression bombs and bad fields are 422 naming the reason, malformed
multipart or JSON 400; every error is a JSON body `{"error": {"status", "code", "message"}}`.

The run folder is only read: any number of processes or replicas can serve one copy of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from dcfeat import __version__
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.errors import BadInput, DcfeatError
from dcfeat.geo import utm_to_latlon
from dcfeat.images import MAX_PIXELS, ImageProblem
from dcfeat.localizer import Answer, Localizer, answers

# GeoPose has no way to say "orientation unknown": 180° is the largest angular error there is.
UNKNOWN_ORIENTATION_DEG = 180.0
IDENTITY_QUATERNION = {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}
# GeoPose camera readings whose bytes are raw pixels rather than an image file: bytes per pixel, PIL mode.
RAW_FORMATS = {"RGBA32": (4, "RGBA"), "GRAY8": (1, "L")}
# Latency buckets (seconds) of /metrics' histograms; batch sizes are bucketed in powers of two.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer: recorded, never sent


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

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_images", "max_body_bytes", "max_pixels", "max_k", "k"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise BadInput(f"{name} {getattr(self, name)!r}: a positive integer is expected")
        if not (self.max_wait_ms >= 0 and self.timeout_s > 0):
            raise BadInput("max_wait_ms must be >= 0 and timeout_s > 0")
        if self.k > self.max_k:
            raise BadInput(f"k {self.k} is more than max_k {self.max_k}")


class Problem(Exception):
    """An HTTP error answer: its status, a short code and one message that says what to fix."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


def _error(problem: Problem, extra: dict | None = None) -> JSONResponse:
    return JSONResponse({**(extra or {}), **problem.body()}, status_code=problem.status, headers=problem.headers)


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
                      "# HELP dcfeat_images_total Images answered.", "# TYPE dcfeat_images_total counter",
                      f"dcfeat_images_total {self.images}",
                      "# HELP dcfeat_abstained_total Answers below min_confidence.",
                      "# TYPE dcfeat_abstained_total counter", f"dcfeat_abstained_total {self.abstained}"]
        return "\n".join(lines) + "\n"


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

async def read_body(request: Request, config: ServeConfig, started: float) -> bytes:
    """The whole body, refused with 413 past max_body_bytes (from Content-Length before reading) and
    with 408 when it has not arrived within timeout_s of the request's start."""
    length = request.headers.get("content-length")
    too_large = Problem(413, "body_too_large", f"the request body is larger than {config.max_body_bytes:,} bytes; "
                        "send smaller images or fewer per request (dcfeat serve --max-body-mb)")
    if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
        raise too_large
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
            raise too_large
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
    if p is not None and not localizer.calibrated:
        raise Problem(422, "uncalibrated_run", "min_confidence needs a calibrated run, and this server's run has no "
                      "calibration.json: leave min_confidence out, or serve a run fitted with `dcfeat calibrate`")
    return k, p


class _Parser(MultiPartParser):
    spool_max_size = 1 << 62  # the body is in memory already: keep its parts there


async def _one(body: bytes):
    yield body


async def multipart_images(request: Request, body: bytes, config: ServeConfig) -> tuple[list[tuple[str, bytes]], dict]:
    """([(name, bytes)] of every file part in order, {field: value} of the text parts); 400 when the
    body is not valid multipart, 413 past max_images."""
    try:
        form = await _Parser(request.headers, _one(body), max_files=config.max_images + 1,
                             max_fields=32, max_part_size=1 << 16).parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise Problem(413, "too_many_images", f"more than {config.max_images} images in one request; send "
                          "them in several (dcfeat serve --max-images)") from None
        raise Problem(400, "malformed_multipart", f"the multipart body cannot be parsed ({e.message})") from None
    except (ValueError, KeyError, AssertionError) as e:  # python-multipart's own complaints
        raise Problem(400, "malformed_multipart", f"the multipart body cannot be parsed ({e})") from None
    parts, fields = [], {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            parts.append((value.filename or key, await value.read()))
        else:
            fields[key] = value
    return parts, fields


async def decode_all(localizer: Localizer, parts: list[tuple[str, bytes]], config: ServeConfig,
                     limiter: asyncio.Semaphore) -> list[np.ndarray]:
    """Every image decoded in a thread (at most one per core at a time); 422 naming each that cannot be."""

    def decode(data: bytes):
        if not data:
            raise ImageProblem("empty: 0 bytes")
        return localizer.decode(data, max_pixels=config.max_pixels)

    async def one(data: bytes):
        async with limiter:
            try:
                return await asyncio.to_thread(decode, data)
            except ImageProblem as e:
                return e

    decoded = await asyncio.gather(*(one(data) for _, data in parts))
    bad = [f"{name}: {d}" for (name, _), d in zip(parts, decoded) if isinstance(d, ImageProblem)]
    if bad:
        raise Problem(422, "undecodable_image", f"{len(bad)} of {len(parts)} images cannot be used: "
                      + "; ".join(bad) + ". Send JPEG, PNG, WebP, TIFF or BMP files that open, each under "
                      f"{config.max_pixels:,} pixels")
    return decoded


DESCRIPTOR_FIELDS = ("descriptors", "ids", "k", "min_confidence")


def descriptor_request(body: bytes, localizer: Localizer, config: ServeConfig) -> tuple[np.ndarray, list[str], dict]:
    """(descriptors (n, dim) float32, their ids, the k / min_confidence fields as text) of a JSON body
    `{"descriptors": [[...], ...], "ids": [...], "k": 5, "min_confidence": 0.5}`: 400 when it is not
    JSON, 413 past max_images descriptors, 422 naming what is wrong with it."""
    dim = localizer.dim
    form = f'{{"descriptors": [[...{dim} numbers], ...], "ids": [...], "k": 5, "min_confidence": 0.5}}'

    def bad(message: str, code: str = "bad_descriptors") -> Problem:
        return Problem(422, code, f"{message}; send {form} (ids, k and min_confidence optional)")

    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise Problem(400, "malformed_json", f"the body is not JSON ({e}); send {form}") from None
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


def geopose_image(doc) -> tuple[bytes, str]:
    """(image bytes, what they are) of a GeoPoseReq's first camera reading; 422 naming the field."""
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
    if fmt.upper() in RAW_FORMATS:  # raw pixels: width × height × bytes per pixel
        depth, mode = RAW_FORMATS[fmt.upper()]
        size = camera.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
            raise bad(f"imageFormat {fmt} needs `size` [width, height]")
        if len(data) != size[0] * size[1] * depth:
            raise bad(f"imageFormat {fmt} of size {size} needs {size[0] * size[1] * depth:,} bytes, got {len(data):,}")
        buffer = io.BytesIO()
        Image.frombytes(mode, tuple(size), data).save(buffer, format="PNG")
        return buffer.getvalue(), f"camera reading ({fmt})"
    return data, "camera reading"


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


def create_app(localizer: Localizer, config: ServeConfig | None = None) -> FastAPI:
    """The service of one loaded run (the worker thread starts with the app's lifespan)."""
    config = config or ServeConfig()
    metrics = Metrics()
    batcher = Batcher(localizer, config, metrics)
    decoding = {}  # the semaphore of concurrent decodes, made in the serving event loop
    page = resources.files("dcfeat").joinpath("static/index.html").read_text(encoding="utf-8")
    cell_table = cells(localizer)

    async def lifespan(app):
        decoding["limiter"] = asyncio.Semaphore(max(1, os.cpu_count() or 1))
        batcher.start()
        yield
        batcher.stop()

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
        arrays = await decode_all(localizer, parts, config, decoding["limiter"])
        loop = asyncio.get_running_loop()
        return await answered(Job(arrays, [name for name, _ in parts], k, min_confidence, loop.create_future(), loop),
                              started)

    async def locate_descriptors(body: bytes, query: dict, started: float) -> list[Answer]:
        features, ids, fields = descriptor_request(body, localizer, config)
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
        """Run a POST handler: a Problem becomes its JSON error, a client gone away a recorded 499."""
        started = time.monotonic()
        try:
            return await handle(started)
        except Problem as e:
            return _error(e, wrap(e) if wrap else None)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        except DcfeatError as e:
            return _error(Problem(422, "bad_request", str(e)), wrap and wrap(None))

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
                    parts, form_fields = await multipart_images(request, body, config)
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
    async def geopose(request: Request):
        request_id = {"id": None}

        def wrap(_):
            return {"id": request_id["id"], "timestamp": int(time.time() * 1000), "type": "geopose"}

        async def handle(started: float):
            body = await read_body(request, config, started)
            try:
                doc = json.loads(body)
            except (ValueError, UnicodeDecodeError) as e:
                raise Problem(400, "malformed_json", f"the body is not JSON ({e}); send a GeoPoseReq") from None
            if isinstance(doc, dict) and isinstance(doc.get("id"), str):
                request_id["id"] = doc["id"]
            data, what = geopose_image(doc)
            if not localizer.calibrated:
                raise Problem(501, "uncalibrated_run", "GeoPose answers need an accuracy, and this server's run has "
                              "no calibration.json: fit one with `dcfeat calibrate --run RUN --split val`")
            _, min_confidence = request_options(dict(request.query_params), localizer, config)
            [answer] = await locate_images([(what, data)], config.k, min_confidence, started)
            if answer.abstained:
                raise Problem(404, "abstained", f"no pose: the answer's confidence {answer.confidence:.3f} is below "
                              f"min_confidence {min_confidence:g} (the probability that it lies within "
                              f"{answer.threshold_m:g} m)")
            return JSONResponse(geopose_response(doc["id"], answer))

        return await guarded(request, handle, wrap)

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

    endpoints = {"/v1/locate", "/scrs/geopose", "/health", "/v1/run", "/v1/cells", "/metrics", "/"}
    app.add_middleware(MetricsMiddleware, metrics=metrics, endpoints=endpoints)
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
              workers: int = 1, max_connections: int = 128, threads: int | None = None, log_level: str = "info") -> None:
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
    options = {"host": host, "port": port, "limit_concurrency": max_connections, "log_level": log_level,
               "timeout_graceful_shutdown": 5}
    if workers == 1:
        uvicorn.run(create_app(localizer, config), **options)
        return
    del localizer
    os.environ[CONFIG_ENV] = json.dumps({"run": str(Path(run_dir).resolve()), "device": device, "scoring": scoring,
                                         "model": model, "threads": threads, "config": asdict(config)})
    uvicorn.run("dcfeat.serve:app_from_env", factory=True, workers=workers, **options)
