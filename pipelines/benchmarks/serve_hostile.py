"""`dcfeat serve` under hostile and heavy clients, on loopback: how fast /health answers under a slowloris, while
a maximal GeoPose request or a maximal PNG is in flight, and the server's resident memory under 128 concurrent
maximal requests.

The server is the real command (`dcfeat serve`, its uvicorn options and connection guard), on a run trained
here on a rendered street city with a random DINOv2 (`pipelines.benchmarks.serve.make_run`): the figures measure the
service, not DINOv2. Every client runs in this process against 127.0.0.1; every loop is bounded in time.
Run from the repository root, niced on a shared machine: `nice python -m pipelines.benchmarks run serve_hostile`
(about 10 minutes on 2 cores).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import select
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click
import httpx
import numpy as np
from PIL import Image

from pipelines.benchmarks.markdown import command, measured, not_measured, table
from pipelines.benchmarks.serve import free_port, make_run, rss_mb, start_server, stop_server

SLOW_LINE = b"X-Slow: 1\r\n"
MAX_BODY = 16 << 20  # dcfeat serve's default --max-body-mb


def hwm_mb(pid: int) -> float:
    """Peak resident memory of a process so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def health(url: str, seconds: float, every: float = 0.1) -> dict:
    """GET /health on a new connection every `every` s for `seconds`: latency (ms, connecting included) and
    statuses. By hand on a socket: httpx builds an SSL context per call, ~80 ms here, which would be measured."""
    host, port = url.removeprefix("http://").split(":")
    latencies, statuses = [], {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        try:
            with socket.create_connection((host, int(port)), timeout=30) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                reply = b""
                while chunk := s.recv(4096):
                    reply += chunk
            status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "no answer"
        except OSError as e:
            status = type(e).__name__
        latencies.append((time.perf_counter() - t) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        time.sleep(every)
    lat = np.asarray(latencies)
    return {"samples": len(lat), "median_ms": float(np.median(lat)), "p90_ms": float(np.percentile(lat, 90)),
            "max_ms": float(lat.max()), "statuses": statuses}


class Slowloris(threading.Thread):
    """`n` connections that each send a request line, then one header line every `every` s and never the blank
    line that ends the headers; a connection the server closes is opened again at once. Counts the server's
    answers to them by status."""

    def __init__(self, url: str, n: int = 130, every: float = 2.0):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.address, self.n, self.every = (host, int(port)), n, every
        self.stop, self.answers, self.reconnects = threading.Event(), {}, 0

    def _open(self) -> socket.socket:
        s = socket.create_connection(self.address)
        s.sendall(b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n")
        return s

    def run(self) -> None:
        socks = [self._open() for _ in range(self.n)]
        try:
            while not self.stop.wait(self.every):
                for i, s in enumerate(socks):
                    if select.select([s], [], [], 0)[0]:  # the server answered or closed it
                        reply = s.recv(200)
                        status = reply.split(b" ", 2)[1].decode() if reply.startswith(b"HTTP/") else "closed"
                        self.answers[status] = self.answers.get(status, 0) + 1
                        s.close()
                        socks[i] = s = self._open()
                        self.reconnects += 1
                    try:
                        s.sendall(SLOW_LINE)
                    except OSError:
                        s.close()
                        socks[i] = self._open()
                        self.reconnects += 1
        finally:
            for s in socks:
                s.close()


def geopose_body(side: int = 1760) -> bytes:
    """A GeoPoseReq of raw RGBA32 pixels as large as a 16 MB body holds (base64 of side² × 4 bytes)."""
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 4), dtype=np.uint8).tobytes()
    doc = {"id": "bench", "timestamp": 0, "type": "geopose", "sensors": [{"id": "c", "type": "camera"}],
           "sensorReadings": {"cameraReadings": [{"sensorId": "c", "imageFormat": "RGBA32", "size": [side, side],
                                                  "imageBytes": base64.b64encode(pixels).decode()}]}}
    body = json.dumps(doc).encode()
    assert len(body) <= MAX_BODY, len(body)
    return body


def png_body(side: int = 8000) -> bytes:
    """A PNG of side² RGB pixels (64 Mpx at 8000, within the default decode budget), smooth so that it is small."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.broadcast_to(ramp, (side, side)), np.broadcast_to(ramp[:, None], (side, side)),
                       np.full((side, side), 128, np.float32)], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    assert buffer.tell() <= MAX_BODY, buffer.tell()
    return buffer.getvalue()


class Sender(threading.Thread):
    """POSTs `body` to `path` back to back, one at a time, until stopped; counts the statuses."""

    def __init__(self, url: str, path: str, body: bytes, content_type: str):
        super().__init__(daemon=True)
        self.url, self.path, self.body, self.content_type = url, path, body, content_type
        self.stop, self.statuses, self.seconds = threading.Event(), {}, []

    def run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                t = time.perf_counter()
                status = client.post(self.url + self.path, content=self.body,
                                     headers={"content-type": self.content_type}).status_code
                self.seconds.append(time.perf_counter() - t)
                self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1


def while_sending(url: str, path: str, body: bytes, content_type: str, seconds: float) -> dict:
    sender = Sender(url, path, body, content_type)
    sender.start()
    time.sleep(0.5)  # its first body on the way
    found = health(url, seconds)
    sender.stop.set()
    sender.join(timeout=180)
    return {**found, "requests": sender.statuses,
            "request_seconds_median": statistics.median(sender.seconds) if sender.seconds else None}


async def _many(url: str, body: bytes, clients: int, max_seconds: float) -> dict:
    """`clients` concurrent POST /scrs/geopose of `body`, each retried a second after a 503 (Retry-After; a
    connection the server closes as the body is written is one too: it answered before reading it) until
    answered otherwise or `max_seconds` pass; bodies written in 64 KB pieces (one copy of `body` on this side)."""
    host, port = url.removeprefix("http://").split(":")
    statuses, refused = {}, 0
    end = time.monotonic() + max_seconds
    view = memoryview(body)

    async def one():
        nonlocal refused
        while time.monotonic() < end:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(b"POST /scrs/geopose HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
                for at in range(0, len(body), 1 << 16):
                    writer.write(view[at:at + (1 << 16)])
                    await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
            except (OSError, asyncio.IncompleteReadError):  # refused unread (503): the server closed as we wrote
                status = 503
            finally:
                writer.close()
            if status == 503:
                refused += 1
                await asyncio.sleep(1)
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            return
        statuses["gave up"] = statuses.get("gave up", 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return {"clients": clients, "statuses": statuses, "refused_503_then_retried": refused,
            "seconds": time.perf_counter() - start}


def rss_under_load(url: str, pid: int, body: bytes, clients: int, max_seconds: float) -> dict:
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(0.05):
            samples.append(rss_mb(pid))

    before = rss_mb(pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    found = asyncio.run(_many(url, body, clients, max_seconds))
    stop.set()
    sampler.join()
    return {**found, "rss_before_mb": before, "rss_peak_sampled_mb": max(samples, default=before),
            "rss_hwm_mb": hwm_mb(pid), "rss_after_mb": rss_mb(pid)}


def measure_once(run: Path, geopose: bytes, png: bytes, *, seconds: float, clients: int) -> dict:
    """One server's life: /health alone, under a slowloris of 130, beside a maximal GeoPose and a maximal PNG
    request, then the resident memory under `clients` concurrent maximal GeoPose requests."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(run, port)
    try:
        httpx.post(url + "/scrs/geopose", content=geopose, timeout=120)  # warm-up: threads, allocator
        out = {"idle": health(url, seconds / 2)}
        attack = Slowloris(url)
        attack.start()
        time.sleep(1.0)  # all 130 connected
        out["slowloris"] = health(url, seconds)
        attack.stop.set()
        attack.join(timeout=30)
        out["slowloris"].update(connections=attack.n, answered_to_slow_clients=attack.answers,
                                reconnects=attack.reconnects)
        out["geopose_in_flight"] = while_sending(url, "/scrs/geopose", geopose, "application/json", seconds)
        out["png_in_flight"] = while_sending(url, "/v1/locate", png, "image/png", seconds)
        out["rss"] = rss_under_load(url, server.pid, geopose, clients, max_seconds=300)
        out["alive_after"] = httpx.get(url + "/health", timeout=30).status_code == 200
    finally:
        stop_server(server)
    return out


OPTIONS = [
    click.Option(["--run", "run_dir"], type=click.Path(path_type=Path, exists=True), default=None,
                 help="A calibrated run folder to serve [default: one trained here on a rendered city]."),
    click.Option(["--runs"], default=3, show_default=True, type=click.IntRange(1),
                 help="Servers measured one after the other (medians over them)."),
    click.Option(["--seconds"], default=15.0, show_default=True, help="Length of each /health sampling phase."),
    click.Option(["--clients"], default=128, show_default=True, type=click.IntRange(1),
                 help="Concurrent maximal requests of the memory phase.")]


def measure(*, run_dir: Path | None = None, runs: int = 3, seconds: float = 15.0, clients: int = 128) -> dict:
    """`runs` servers' lives (measure_once) and the median over runs of each /health median; on `run_dir`, or on
    a run trained here on a rendered city."""
    with tempfile.TemporaryDirectory() as tmp:
        if run_dir is None:
            run_dir, _ = make_run(Path(tmp), hidden=32, layers=2, image_size=56)
        return _medians(run_dir, runs=runs, seconds=seconds, clients=clients)


def _medians(run: Path, *, runs: int, seconds: float, clients: int) -> dict:
    geopose, png = geopose_body(), png_body()
    rounds = [measure_once(run, geopose, png, seconds=seconds, clients=clients) for _ in range(runs)]
    phases = ("idle", "slowloris", "geopose_in_flight", "png_in_flight")
    return {"runs": rounds, "geopose_body_bytes": len(geopose), "png_body_bytes": len(png),
            "health_median_ms": {p: statistics.median(r[p]["median_ms"] for r in rounds) for p in phases},
            "health_p90_ms": {p: statistics.median(r[p]["p90_ms"] for r in rounds) for p in phases},
            "rss_hwm_mb": statistics.median(r["rss"]["rss_hwm_mb"] for r in rounds),
            "rss_before_mb": statistics.median(r["rss"]["rss_before_mb"] for r in rounds)}


def render(results: list[dict]) -> str:
    """`/health` under slow and maximal clients, and RSS under 128 maximal requests (python -m pipelines.benchmarks run serve_hostile)."""
    if not results:
        return not_measured("serve_hostile")
    h = results[-1]
    med, p90, runs = h["health_median_ms"], h["health_p90_ms"], h["runs"]
    said = {"idle": "idle", "slowloris": "130 connections sending one header line every 2 s (slowloris)",
            "geopose_in_flight": f"maximal GeoPose requests ({h['geopose_body_bytes'] / 1e6:.1f} MB) back to back",
            "png_in_flight": "maximal PNG requests (8000² RGB) back to back"}
    rows = [[what, f"**{med[k]:.1f} ms**", f"{p90[k]:.1f} ms", "< 100 ms" if k != "idle" else "—"]
            for k, what in said.items()]
    rss = [r["rss"] for r in runs]
    return (f"A random tiny DINOv2 at 56 px on this 2-core CPU{measured(h)}, loopback; median over {len(runs)} server "
            "lifetimes of the median `/health` latency (TCP connect included) while each load runs "
            f"({command('serve_hostile')}):\n\n"
            + table(["while", "`/health` median", "p90", "goal"], rows)
            + f"\n\nEvery slow client was cut off with 408 at `--header-timeout`. Memory: {rss[0]['clients']} "
            f"concurrent maximal GeoPose requests, each retried after its 503 `busy` (about "
            f"{sorted(r['refused_503_then_retried'] for r in rss)[len(rss) // 2]} refusals), all answered 200; peak RSS "
            f"**{h['rss_hwm_mb'] / 1024:.2f} GB** against {h['rss_before_mb'] / 1024:.2f} GB before the load. The bound "
            "is the base + 2 × `--max-inflight-mb` + `--max-decode-mb` (about 1.5 GiB with the defaults) whatever the "
            "number of connections; before these bounds, 128 × 3 copies of a 16 MB body could reach ~6 GB.")
