"""`dcfeat serve`: every endpoint, GeoPose field by field, every hostile request, and micro-batching.

FastAPI's TestClient where one request at a time says enough; a real uvicorn on 127.0.0.1 (a free
port) for concurrent requests, clients that go away or send slowly, and bodies refused unread.
"""

import base64
import io
import json
import os
import shutil
import socket
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dcfeat.localizer import Localizer
from dcfeat.predict import predict_files
from dcfeat.serve import UNKNOWN_ORIENTATION_DEG, ServeConfig, create_app
from pipelines.benchmarks.serve import raw as raw_exchange
from tests.conftest import invoke, jpeg_bytes, live_server, refused


@pytest.fixture(scope="module")
def localizer(calibrated_run) -> Localizer:
    loc = Localizer.from_run(calibrated_run, device="cpu")
    _ = loc.backbone
    return loc


@pytest.fixture(scope="module")
def client(localizer):
    with TestClient(create_app(localizer, ServeConfig(max_wait_ms=1))) as c:
        yield c


def geopose_request(image: bytes, **camera) -> dict:
    """A GeoPoseReq of the OSCP protocol (v2: `sensorReadings.cameraReadings`) with one camera image."""
    reading = {"timestamp": 1700000000000, "sensorId": "cam0", "privacy": {}, "sequenceNumber": 0,
               "imageFormat": "JPG", "size": [100, 80], "imageBytes": base64.b64encode(image).decode(), **camera}
    return {"id": "req-42", "timestamp": 1700000000000, "type": "geopose",
            "sensors": [{"id": "cam0", "type": "camera"}], "sensorReadings": {"cameraReadings": [reading]}}


def assert_error(r, status: int, code: str, *words: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["status"] == status and body["error"]["code"] == code, body
    for w in words:
        assert w in body["error"]["message"], (w, body)
    return body


# --------------------------------------------------------------------------- /v1/locate

def test_locate_takes_multipart_parts_and_raw_bodies_with_k_from_query_or_form(client, localizer):
    a, b = jpeg_bytes(1), jpeg_bytes(2)
    r = client.post("/v1/locate?k=2", files=[("image", ("a.jpg", a, "image/jpeg")), ("photo", ("b.jpg", b, "image/jpeg"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["image"] for x in body["answers"]] == ["a.jpg", "b.jpg"]
    assert all(len(x["top_k"]) == 2 for x in body["answers"])
    assert body["random_backbone"] is True and body["notice"].startswith("RANDOM BACKBONE")
    expected = [x.to_dict() for x in localizer.locate([a, b], ids=["a.jpg", "b.jpg"], k=2)]
    for got, want in zip(body["answers"], expected):
        assert [c["class"] for c in got["top_k"]] == [c["class"] for c in want["top_k"]]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-6)
        assert (got["lat"], got["lon"], got["utm"]) == (want["lat"], want["lon"], want["utm"])
    r = client.post("/v1/locate", files=[("image", ("a.jpg", a, "image/jpeg"))], data={"k": "3"})
    assert len(r.json()["answers"][0]["top_k"]) == 3
    r = client.post("/v1/locate", content=a, headers={"content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["answers"][0]["image"] == "body"
    assert len(r.json()["answers"][0]["top_k"]) == min(5, localizer.classes)  # the server's default k


def test_locate_answers_what_predict_writes(client, calibrated_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(jpeg_bytes(10 + i))
    frame = predict_files(calibrated_run, tmp_path / "p.parquet", images=folder, k=3, device="cpu", progress=False,
                          workers=0).frame
    r = client.post("/v1/locate?k=3", files=[("image", (p.name, p.read_bytes(), "image/jpeg"))
                                             for p in sorted(folder.iterdir())])
    for answer in r.json()["answers"]:
        rows = frame.filter(pl.col("image_id") == answer["image"]).sort("rank")
        assert [c["class"] for c in answer["top_k"]] == rows["class"].to_list()
        assert [c["probability"] for c in answer["top_k"]] == pytest.approx(rows["probability"].to_list(), abs=1e-6)
        assert answer["confidence"] == pytest.approx(rows["confidence"][0], abs=1e-6)
        assert answer["radius_m"] == pytest.approx(rows["radius_m"][0], rel=1e-6)
        assert (answer["lat"], answer["lon"]) == pytest.approx((rows["lat"][0], rows["lon"][0]))


def test_an_abstention_stays_an_answer_marked_as_such(client):
    r = client.post("/v1/locate?min_confidence=1", content=jpeg_bytes(3))
    [answer] = r.json()["answers"]
    assert r.status_code == 200 and answer["abstained"] is True and answer["confidence"] < 1
    assert client.post("/v1/locate?min_confidence=0.0001", content=jpeg_bytes(3)).json()["answers"][0]["abstained"] is False


@pytest.mark.parametrize("query, words", [("k=0", "k=0"), ("k=1000000000", "k=1000000000"), ("k=two", "integer"),
                                          ("min_confidence=2", "(0, 1]"), ("min_confidence=0", "(0, 1]"),
                                          ("min_confidence=nan", "finite")])
def test_fields_out_of_range_are_422_naming_the_field(client, query, words):
    assert_error(client.post(f"/v1/locate?{query}", content=jpeg_bytes(0)), 422, "bad_field", words)


def test_min_confidence_on_an_uncalibrated_run_is_refused(tiny_run):
    with TestClient(create_app(Localizer.from_run(tiny_run, device="cpu"))) as c:
        assert_error(c.post("/v1/locate?min_confidence=0.5", content=jpeg_bytes(0)), 422, "uncalibrated_run",
                     "calibrat")
        r = c.post("/v1/locate", content=jpeg_bytes(0))
        assert r.status_code == 200 and r.json()["answers"][0]["confidence"] is None
        assert_error(c.post("/scrs/geopose", json=geopose_request(jpeg_bytes(0))), 501, "uncalibrated_run",
                     "dcfeat calibrate")


def test_too_many_images_and_a_full_queue_are_refused_at_once(localizer):
    parts = [("image", (f"{i}.jpg", jpeg_bytes(i), "image/jpeg")) for i in range(3)]
    with TestClient(create_app(localizer, ServeConfig(max_images=2))) as c:
        assert_error(c.post("/v1/locate", files=parts), 413, "too_many_images", "at most 2")
    with TestClient(create_app(localizer, ServeConfig(max_queue=2))) as c:
        r = c.post("/v1/locate", files=parts)
        assert_error(r, 503, "queue_full", "retry")
        assert r.headers["retry-after"] == "1"
        assert c.post("/v1/locate", files=parts[:2]).status_code == 200  # it fits: answered


def test_a_request_the_model_cannot_answer_in_time_is_504_and_the_server_goes_on(localizer, monkeypatch):
    release = threading.Event()
    real = localizer.embed

    def stuck(images):
        release.wait()
        return real(images)

    with TestClient(create_app(localizer, ServeConfig(timeout_s=0.2))) as c:
        monkeypatch.setattr(localizer, "embed", stuck)
        assert_error(c.post("/v1/locate", content=jpeg_bytes(0)), 504, "model_timeout", "0.2 s")
        release.set()
        monkeypatch.setattr(localizer, "embed", real)
        assert c.post("/v1/locate", content=jpeg_bytes(0)).status_code == 200


# --------------------------------------------------------------------------- descriptors

def test_descriptor_queries_answer_as_locate_features(client, localizer):
    feats = np.random.default_rng(0).standard_normal((3, localizer.dim))
    r = client.post("/v1/locate?k=2", json={"descriptors": feats.tolist(), "ids": ["a", "b", "c"], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()["answers"]
    want = localizer.locate_features(feats, k=2)  # the query's k wins over the body's, as over a form field
    assert [a["image"] for a in body] == ["a", "b", "c"]
    assert [[c["class"] for c in a["top_k"]] for a in body] == [[c["class"] for c in a.top_k] for a in want]
    assert [a["confidence"] for a in body] == pytest.approx([a.confidence for a in want], abs=1e-6)
    r = client.post("/v1/locate", json={"descriptors": feats[:1].tolist(), "min_confidence": 1})
    assert r.json()["answers"][0]["image"] == "#0" and r.json()["answers"][0]["abstained"] is True
    assert client.get("/v1/run").json()["accepts"] == {"images": True, "descriptors": localizer.dim}


def test_a_batch_of_images_and_descriptors_answers_each_as_alone(localizer):
    import asyncio

    from dcfeat.serve import Batcher, Job, Metrics

    loop = asyncio.new_event_loop()
    feats = np.random.default_rng(1).standard_normal((2, localizer.dim)).astype(np.float32)
    jobs = [Job([localizer.decode(jpeg_bytes(5))], ["photo"], 3, None, loop.create_future(), loop),
            Job([], ["a", "b"], 3, None, loop.create_future(), loop, features=feats)]
    Batcher(localizer, ServeConfig(), Metrics())._answer(jobs)  # one forward pass for the photo, one table for all
    photo, described = loop.run_until_complete(asyncio.gather(*(job.future for job in jobs)))
    loop.close()
    want = [*localizer.locate([jpeg_bytes(5)], k=3), *localizer.locate_features(feats, k=3)]
    assert [a.image_id for a in photo + described] == ["photo", "a", "b"]
    assert [[c["class"] for c in a.top_k] for a in photo + described] == [[c["class"] for c in a.top_k] for a in want]


@pytest.mark.parametrize("body, status, code, words", [
    (b"{", 400, "malformed_json", ["not JSON", '"descriptors"']),
    (b"[1, 2]", 422, "bad_descriptors", ["`descriptors`"]),
    (b'{"descriptors": [], "ids": []}', 422, "no_descriptor", ["no descriptor"]),
    (b'{"descriptors": [[1, 2], [3]]}', 422, "bad_descriptors", ["different lengths"]),
    (b'{"descriptors": [["a", "b"]]}', 422, "bad_descriptors", ["lists of numbers"]),
    (b'{"descriptors": [[1, 2, 3]]}', 422, "wrong_dim", ["3 values", "have 32"]),
    (b'{"descriptors": [[NaN' + b", 0" * 31 + b"]]}", 422, "bad_descriptors", ["[0]", "not finite"]),
    (b'{"descriptors": [[1e39' + b", 0" * 31 + b"]]}", 422, "bad_descriptors", ["not finite"]),
    (b'{"descriptors": [[' + b"0, " * 31 + b'0]], "ids": ["a", "b"]}', 422, "bad_descriptors", ["1 strings"]),
    (b'{"descriptors": [[' + b"0, " * 31 + b'0]], "k": 2.5}', 422, "bad_field", ["k='2.5'", "integer"]),
    (b'{"descriptors": [[' + b"0, " * 31 + b'0]], "K": 2}', 422, "bad_descriptors", ["unknown fields ['K']"]),
])
def test_descriptor_requests_that_cannot_be_answered_are_refused(client, body, status, code, words):
    assert_error(client.post("/v1/locate", content=body, headers={"content-type": "application/json"}), status, code,
                 *words)


def test_too_many_descriptors_are_413(localizer):
    with TestClient(create_app(localizer, ServeConfig(max_images=2))) as c:
        r = c.post("/v1/locate", json={"descriptors": np.zeros((3, localizer.dim)).tolist()})
        assert_error(r, 413, "too_many_descriptors", "at most 2", "--max-images")


# --------------------------------------------------------------------------- /scrs/geopose

def test_geopose_answers_field_by_field(client, localizer):
    image = jpeg_bytes(5)
    [answer] = client.post("/v1/locate", content=image).json()["answers"]
    r = client.post("/scrs/geopose", json=geopose_request(image))
    assert r.status_code == 200, r.text
    pose = r.json()
    assert pose["id"] == "req-42" and pose["type"] == "geopose"
    assert isinstance(pose["timestamp"], int) and pose["timestamp"] > 1700000000000  # ms since the epoch, now
    assert pose["accuracy"] == {"position": pytest.approx(answer["radius_m"]), "orientation": UNKNOWN_ORIENTATION_DEG}
    assert pose["geopose"]["position"] == {"lat": pytest.approx(answer["lat"]), "lon": pytest.approx(answer["lon"]),
                                           "h": 0.0}
    assert pose["geopose"]["quaternion"] == {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}
    assert set(pose) == {"id", "timestamp", "type", "accuracy", "geopose", "dcfeat"}
    ours = pose["dcfeat"]
    assert "unknown" in ours["orientation"] and "unknown" in ours["height"]
    assert ours["confidence"] == pytest.approx(answer["confidence"]) and ours["threshold_m"] == 150
    assert ours["utm"] == answer["utm"] and len(ours["top_k"]) == min(5, localizer.classes)


def test_geopose_takes_protocol_v1_readings_and_raw_pixels(client):
    image = jpeg_bytes(5)
    want = client.post("/scrs/geopose", json=geopose_request(image)).json()["geopose"]
    v1 = geopose_request(image)
    v1["sensorReadings"] = [{"timestamp": 1, "sensorId": "cam0", "privacy": {},
                             "reading": v1["sensorReadings"]["cameraReadings"][0]}]
    assert client.post("/scrs/geopose", json=v1).json()["geopose"] == want
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGBA"))
    raw = geopose_request(pixels.tobytes(), imageFormat="RGBA32", size=[100, 80])
    r = client.post("/scrs/geopose", json=raw)
    assert r.status_code == 200 and r.json()["geopose"] == want  # the same pixels, the same pose
    gray = geopose_request(bytes(100 * 80), imageFormat="GRAY8", size=[100, 80])
    assert client.post("/scrs/geopose", json=gray).status_code == 200


def test_an_abstention_is_an_error_response_never_a_pose(client):
    r = client.post("/scrs/geopose?min_confidence=1", json=geopose_request(jpeg_bytes(5)))
    body = assert_error(r, 404, "abstained", "below min_confidence 1")
    assert body["id"] == "req-42" and body["type"] == "geopose" and "geopose" not in body and "accuracy" not in body


def _without(doc: dict, *path) -> dict:
    doc = json.loads(json.dumps(doc))
    inner = doc
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return doc


@pytest.mark.parametrize("mangle, status, code, words", [
    (lambda d: _without(d, "id"), 422, "bad_geopose", "`id`"),
    (lambda d: {**d, "type": "pose"}, 422, "bad_geopose", "`type`"),
    (lambda d: {**d, "timestamp": "yesterday"}, 422, "bad_geopose", "`timestamp`"),
    (lambda d: _without(d, "sensorReadings"), 422, "bad_geopose", "`sensorReadings`"),
    (lambda d: {**d, "sensorReadings": {"cameraReadings": []}}, 422, "bad_geopose", "no camera reading"),
    (lambda d: {**d, "sensorReadings": {"cameraReadings": "x"}}, 422, "bad_geopose", "must be a list"),
    (lambda d: json.loads(json.dumps(d).replace('"imageBytes": "', '"imageBytes": "!!')), 422, "bad_geopose",
     "not valid base64"),
    (lambda d: {**d, "sensorReadings": {"cameraReadings": [{"imageBytes": "AAAA", "imageFormat": "RGBA32",
                                                            "size": [10, 10]}]}}, 422, "bad_geopose", "needs 400"),
    (lambda d: {**d, "sensorReadings": {"cameraReadings": [{"imageBytes": "AAAA"}]}}, 422, "undecodable_image",
     "camera reading"),
    (lambda d: [d], 422, "bad_geopose", "JSON object"),
])
def test_malformed_geopose_requests_are_refused_naming_the_field(client, mangle, status, code, words):
    r = client.post("/scrs/geopose", json=mangle(geopose_request(jpeg_bytes(5))))
    body = assert_error(r, status, code, words)
    assert body["type"] == "geopose" and "geopose" not in body


def test_geopose_that_is_not_json_is_400(client):
    body = assert_error(client.post("/scrs/geopose", content=b'{"id": "x", '), 400, "malformed_json", "not JSON")
    assert body["id"] is None


# --------------------------------------------------------------------------- the other endpoints

def test_health_run_cells_page_and_errors_of_unknown_routes(client, localizer):
    assert client.get("/health").json() == {"status": "ok", "queue_images": 0, "pid": os.getpid()}
    run = client.get("/v1/run").json()
    assert run["classes"] == localizer.classes and run["complete"] is True and run["preset"] == "dcfeat"
    assert run["backbone"]["random"] is True and run["backbone"]["fingerprint"].startswith("v2")
    assert run["backbone"]["image_size"] == 56 and run["notice"].startswith("RANDOM BACKBONE")
    assert run["calibration"]["threshold_m"] == 150 and run["calibration"]["fitted_on"]["split"] == "val"
    assert run["limits"]["max_batch"] == 32
    cells = client.get("/v1/cells").json()
    assert len(cells["x"]) == len(cells["y"]) == cells["classes"] == localizer.classes and cells["M"] == 200
    assert abs(np.mean(cells["x"])) < 1 and abs(np.mean(cells["y"])) < 1  # metres around the cells' centre
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/locate" in page.text and "/v1/cells" in page.text and "https://" not in page.text  # offline
    assert_error(client.get("/v2/nothing"), 404, "not_found", "/v2/nothing")
    assert_error(client.get("/v1/locate"), 405, "method_not_allowed")


def test_metrics_are_prometheus_text_with_requests_latency_batches_and_queue(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.post("/v1/locate", content=jpeg_bytes(0))
    client.post("/v1/locate?k=0", content=jpeg_bytes(0))
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert {"dcfeat_requests", "dcfeat_request_seconds", "dcfeat_batch_images", "dcfeat_forward_seconds",
            "dcfeat_queue_images", "dcfeat_images", "dcfeat_abstained"} <= set(families)
    counts = {(s.labels["endpoint"], s.labels["status"]): s.value for s in families["dcfeat_requests"].samples}
    assert counts[("/v1/locate", "200")] >= 1 and counts[("/v1/locate", "422")] >= 1
    assert families["dcfeat_queue_images"].samples[0].value == 0
    batches = {s.name: s.value for s in families["dcfeat_batch_images"].samples if not s.labels.get("le")}
    assert batches["dcfeat_batch_images_count"] >= 1


# --------------------------------------------------------------------------- hostile clients, real server

def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width × height pixels (10 G by default): a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def server(localizer):
    with live_server(create_app(localizer, ServeConfig(timeout_s=1.0, max_wait_ms=2))) as url:
        yield url


def still_answering(url: str) -> None:
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    r = httpx.post(f"{url}/v1/locate", content=jpeg_bytes(9))
    assert r.status_code == 200 and len(r.json()["answers"]) == 1


@pytest.mark.parametrize("name, send, status, code, words", [
    ("truncated JPEG", lambda u: httpx.post(f"{u}/v1/locate", content=jpeg_bytes(1)[:600]), 422, "undecodable_image",
     "Truncated"),
    ("empty body", lambda u: httpx.post(f"{u}/v1/locate", content=b""), 422, "no_image", "no image"),
    ("empty part", lambda u: httpx.post(f"{u}/v1/locate", files=[("image", ("e.jpg", b"", "image/jpeg"))]), 422,
     "undecodable_image", "e.jpg: empty"),
    ("not an image", lambda u: httpx.post(f"{u}/v1/locate", files=[("image", ("n.txt", b"hello " * 50, "text/plain"))]),
     422, "undecodable_image", "n.txt"),
    ("50 MB upload", lambda u: httpx.post(f"{u}/v1/locate", content=b"\xff" * (50 << 20)), 413, "body_too_large",
     "16,777,216 bytes"),
    ("decompression bomb", lambda u: httpx.post(f"{u}/v1/locate", content=bomb_png()), 422, "undecodable_image",
     "decompression bomb"),
    ("multipart without boundary", lambda u: httpx.post(f"{u}/v1/locate", content=b"--x\r\n",
                                                        headers={"content-type": "multipart/form-data"}),
     400, "malformed_multipart", "multipart"),
    ("malformed GeoPose JSON", lambda u: httpx.post(f"{u}/scrs/geopose", content=b"{]"), 400, "malformed_json", "JSON"),
    ("k=0", lambda u: httpx.post(f"{u}/v1/locate?k=0", content=jpeg_bytes(1)), 422, "bad_field", "k=0"),
    ("k=10^9", lambda u: httpx.post(f"{u}/v1/locate?k=1000000000", content=jpeg_bytes(1)), 422, "bad_field", "k="),
    ("min_confidence=2", lambda u: httpx.post(f"{u}/v1/locate?min_confidence=2", content=jpeg_bytes(1)), 422,
     "bad_field", "min_confidence=2"),
])
def test_each_hostile_request_gets_its_4xx_and_the_server_keeps_answering(server, name, send, status, code, words):
    assert_error(send(server), status, code, words)
    still_answering(server)


def test_a_body_larger_than_announced_is_413_as_it_arrives(server):
    chunks = (b"\xff" * (1 << 20) for _ in range(20))  # chunked: no Content-Length to refuse it by
    assert_error(httpx.post(f"{server}/v1/locate", content=chunks), 413, "body_too_large")
    still_answering(server)


def test_a_client_that_disconnects_mid_upload_leaves_the_server_answering(server):
    head = b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    for _ in range(3):
        raw_exchange(server, head, jpeg_bytes(1)[:500], close_early=True)
    still_answering(server)
    metrics = httpx.get(f"{server}/metrics").text
    assert 'dcfeat_requests_total{endpoint="/v1/locate",status="499"}' in metrics  # recorded as gone away


def test_a_client_that_sends_slowly_gets_408_and_others_are_served_meanwhile(server):
    head = b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(raw_exchange, server, head, b"\xff" * 100)  # then nothing more, within the 1 s timeout
        still_answering(server)
        reply = slow.result()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b'"code":"body_timeout"' in reply
    still_answering(server)


# --------------------------------------------------------------------------- batching

def test_concurrent_requests_share_forward_passes_and_answer_as_one_predict_call(localizer, calibrated_run, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    n = 12
    for i in range(n):
        (folder / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(100 + i, size=(70 + 3 * i, 90)))
    frame = predict_files(calibrated_run, tmp_path / "p.parquet", images=folder, k=3, device="cpu", progress=False,
                          workers=0).frame
    # A long wait: every request sent at once lands in a batch with others, whatever the machine's load.
    with live_server(create_app(localizer, ServeConfig(max_wait_ms=500, max_batch=8))) as url:
        def ask(path: Path):
            return httpx.post(f"{url}/v1/locate?k=3", files=[("image", (path.name, path.read_bytes(), "image/jpeg"))],
                              timeout=60).json()["answers"][0]

        with ThreadPoolExecutor(n) as pool:
            found = list(pool.map(ask, sorted(folder.iterdir())))
        metrics = httpx.get(f"{url}/metrics").text
    for answer in found:
        rows = frame.filter(pl.col("image_id") == answer["image"]).sort("rank")
        assert [c["class"] for c in answer["top_k"]] == rows["class"].to_list()
        assert [c["probability"] for c in answer["top_k"]] == pytest.approx(rows["probability"].to_list(), abs=1e-5)
        assert answer["confidence"] == pytest.approx(rows["confidence"][0], abs=1e-5)
    count = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("dcfeat_batch_images_count"))
    total = next(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("dcfeat_batch_images_sum"))
    assert total == n and count < n  # 12 images in fewer forward passes than requests
    assert 'dcfeat_batch_images_bucket{le="1"} ' in metrics


# --------------------------------------------------------------------------- the run folder and the command

def test_serving_reads_the_run_folder_and_writes_nothing_there(calibrated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    before = {p.relative_to(run): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    loc = Localizer.from_run(run, device="cpu")
    with TestClient(create_app(loc)) as c:
        assert c.post("/v1/locate", content=jpeg_bytes(0)).status_code == 200
        assert c.post("/scrs/geopose", json=geopose_request(jpeg_bytes(0))).status_code == 200
    after = {p.relative_to(run): (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_serve_refuses_a_missing_run_or_a_bad_option_before_listening(tmp_path, tiny_run):
    refused(invoke("serve", "--run", tmp_path / "nope"), "bad input", "not a complete run folder")
    refused(invoke("serve", "--run", tiny_run, "--min-confidence", "0.5"), "bad input", "calibrated run")
    r = invoke("serve", "--port", "70000")
    assert r.exit_code == 2 and "70000" in r.output
    assert "POST /v1/locate" in invoke("serve", "--help").output


def test_a_worker_process_builds_its_app_from_the_settings_serve_hands_it(calibrated_run, localizer, monkeypatch):
    """What each process of `serve --workers N` runs (app_from_env), in this process: the run and its backbone
    from the settings serve_run writes, answering a photo as the run's Localizer does."""
    from dcfeat.serve import CONFIG_ENV, app_from_env, worker_settings

    settings = worker_settings(calibrated_run, device="cpu", scoring="cosine", model=None, threads=1,
                               config=ServeConfig(max_wait_ms=1, max_images=3), database=None)
    monkeypatch.setenv(CONFIG_ENV, settings)
    with TestClient(app_from_env()) as c:
        image = jpeg_bytes(6)
        r = c.post("/v1/locate?k=3", content=image, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        (want,) = localizer.locate([image], k=3)
        assert [x["class"] for x in r.json()["answers"][0]["top_k"]] == [x["class"] for x in want.top_k]
        assert c.get("/v1/run").json()["limits"]["max_images"] == 3  # the settings' ServeConfig, not the default


@pytest.mark.slow
def test_several_worker_processes_serve_one_run_on_one_port(city_run, city_store):
    """Two processes answer on one port. A run of descriptors (no backbone to load: each process starts in
    ~1.5 s of CPU instead of ~5); how a worker builds its app from the settings is the test above."""
    import subprocess
    import sys
    import time

    from dcfeat.store import read_split
    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dcfeat", "serve", "--run", str(city_run), "--port", str(port),
                             "--device", "cpu", "--workers", "2"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    # A new connection for every request, as separate clients would open (whichever process accepts it
    # answers); one client, so that httpx builds its SSL context once, not at every poll.
    client = httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0))
    pids = set()
    try:
        for _ in range(1200):  # polled until both processes have answered (bounded in tries)
            assert proc.poll() is None, proc.stderr.read()
            try:
                r = client.get(f"{url}/health", timeout=2)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
                    if len(pids) == 2:
                        break
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # the other process may still be loading its run
        assert len(pids) == 2 and proc.pid not in pids  # two worker processes answered, neither the supervisor
        query = {"descriptors": read_split(city_store, "test", dtype=np.float32).embeddings[:2].tolist(), "k": 3}
        answers = [client.post(f"{url}/v1/locate", json=query).json()["answers"] for _ in range(6)]
        assert all(len(a) == 2 and a == answers[0] for a in answers)
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=60)


# --------------------------------------------------------------------------- slow, costly and concurrent clients

def png_header(width: int, height: int, color_type: int = 6) -> bytes:
    """A PNG whose header says width × height pixels of `color_type` (6: RGBA, 2: RGB, 0: grey) with almost no
    pixel data: what it would cost to decode is in its header, nothing else."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def png_bytes(side: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (seed % 256, 90, 160)).save(buffer, "PNG")
    return buffer.getvalue()


def readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_clients_that_send_their_headers_slowly_are_cut_off_and_health_answers_meanwhile(localizer):
    from dcfeat.serve import uvicorn_options

    config = ServeConfig(max_connections=8, header_timeout_s=3.0)
    with live_server(create_app(localizer, config), **uvicorn_options(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        slow = [socket.create_connection((host, int(port))) for _ in range(20)]  # more than max_connections
        try:
            for s in slow:
                s.sendall(b"POST /v1/locate HTTP/1.1\r\nHost: x\r\n")
            for s in slow:
                s.sendall(b"X-Slow: 1\r\n")  # one header line at a time, never the blank line that ends them
            assert httpx.get(f"{url}/health").status_code == 200
            assert httpx.post(f"{url}/v1/locate", content=jpeg_bytes(9)).status_code == 200
            assert not any(readable(s) for s in slow)  # all 20 still connected, unanswered, while those were served
            for s in slow:
                s.settimeout(60)
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
                assert b'"code":"header_timeout"' in reply
        finally:
            for s in slow:
                s.close()
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + (b"X-Pad: " + b"a" * 1000 + b"\r\n") * 40
        reply = raw_exchange(url, head)  # 40 KB of headers, no end: refused before the deadline
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert httpx.get(f"{url}/health").status_code == 200


def test_images_too_costly_to_decode_are_refused_from_their_headers(localizer, monkeypatch):
    decoded = []
    real = localizer.decode
    monkeypatch.setattr(localizer, "decode", lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    with TestClient(create_app(localizer, ServeConfig(max_decode_bytes=64 << 20))) as c:
        six = [("image", (f"{i}.png", png_header(9400, 9400), "image/png")) for i in range(6)]
        assert_error(c.post("/v1/locate", files=six), 413, "decode_budget", "0.png", "9400x9400", "RGBA",
                     "--max-decode-mb")
        four = [("image", (f"{i}.png", png_header(1500, 1500, 2), "image/png")) for i in range(4)]
        assert_error(c.post("/v1/locate", files=four), 413, "decode_budget", "together", "--max-decode-mb")
        assert decoded == []  # refused from the headers alone
        big = png_bytes(1000)  # an 8-bit RGB photo of 1000², well within the budget: decoded and answered
        assert c.post("/v1/locate", files=[("image", ("big.png", big, "image/png"))]).status_code == 200


def test_a_small_image_is_decoded_while_huge_ones_of_another_request_wait(localizer, monkeypatch):
    import os

    release, entered = threading.Event(), threading.Semaphore(0)
    real = localizer.decode

    def decode(image, **kw):
        if bytes(image[:4]) == b"\x89PNG":  # the big photos: held in their decoding thread until released
            entered.release()
            assert release.wait(60)
        return real(image, **kw)

    monkeypatch.setattr(localizer, "decode", decode)
    cores = os.cpu_count() or 1
    big = [("image", (f"{i}.png", png_bytes(1200, i), "image/png")) for i in range(cores + 2)]
    with live_server(create_app(localizer, ServeConfig(timeout_s=60))) as url, ThreadPoolExecutor(1) as pool:
        huge = pool.submit(httpx.post, f"{url}/v1/locate", files=big, timeout=90)
        try:
            for _ in range(cores):  # every decoding slot taken by a big photo
                assert entered.acquire(timeout=60)
            r = httpx.post(f"{url}/v1/locate", content=jpeg_bytes(9), timeout=30)
            assert r.status_code == 200 and not huge.done()  # answered while every big one still decodes or waits
        finally:
            release.set()
        assert huge.result().status_code == 200


def test_geopose_and_descriptor_bodies_are_parsed_off_the_event_loop(client, localizer, monkeypatch):
    import asyncio

    from dcfeat.serve import app as routes  # where the routes look the parsers up

    on_loop, called = [], set()

    def watched(real):
        def parse(*args, **kw):
            called.add(real.__name__)
            try:
                asyncio.get_running_loop()
                on_loop.append(real.__name__)
            except RuntimeError:  # no loop runs in this thread: a worker thread
                pass
            return real(*args, **kw)
        return parse

    monkeypatch.setattr(routes, "geopose_image", watched(routes.geopose_image))
    monkeypatch.setattr(routes, "descriptor_request", watched(routes.descriptor_request))
    monkeypatch.setattr(routes, "multipart_images", watched(routes.multipart_images))
    assert client.post("/scrs/geopose", json=geopose_request(jpeg_bytes(5))).status_code == 200
    assert client.post("/v1/locate", json={"descriptors": np.zeros((1, localizer.dim)).tolist()}).status_code == 200
    assert client.post("/v1/locate", files=[("image", ("a.jpg", jpeg_bytes(1), "image/jpeg"))]).status_code == 200
    assert on_loop == [] and called == {"geopose_image", "descriptor_request", "multipart_images"}


def test_an_unexpected_error_is_a_json_500_and_counted_as_500(localizer, monkeypatch):
    from dcfeat.serve import app as routes

    def broken(*args, **kw):
        raise RuntimeError("a bug")

    with TestClient(create_app(localizer), raise_server_exceptions=False) as c:
        monkeypatch.setattr(routes, "request_options", broken)
        assert_error(c.post("/v1/locate", content=jpeg_bytes(0)), 500, "internal_error", "server log")
        assert 'dcfeat_requests_total{endpoint="/v1/locate",status="500"} 1' in c.get("/metrics").text


@pytest.mark.parametrize("path", ["/v1/locate", "/scrs/geopose"])
def test_json_nested_too_deeply_is_400(client, path):
    body = b"[" * 200_000 + b"]" * 200_000
    assert_error(client.post(path, content=body, headers={"content-type": "application/json"}), 400,
                 "malformed_json", "nested")


def test_bodies_beyond_the_in_flight_budget_are_refused_before_they_are_read(localizer):
    config = ServeConfig(max_body_bytes=1 << 20, max_inflight_bytes=(1 << 20) + (100 << 10), timeout_s=5)
    with live_server(create_app(localizer, config)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as holder:  # a 1 MB body on its way, slowly
            holder.sendall(b"POST /v1/locate HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                           b"Content-Length: 1048576\r\n\r\n" + b"\xff" * 1000)
            assert in_flight_bytes(url, until=lambda n: n == 1 << 20) == 1 << 20  # its whole body is counted
            r = httpx.post(f"{url}/v1/locate", content=png_bytes(700) + b"\0" * (900 << 10))
            assert_error(r, 503, "busy", "retry")
            assert r.headers["retry-after"] == "1"
            assert httpx.post(f"{url}/v1/locate", content=jpeg_bytes(9)).status_code == 200  # fits beside it
            chunked = (b"\xff" * 1000 for _ in range(3))  # no Content-Length: counted as max_body_bytes
            assert_error(httpx.post(f"{url}/v1/locate", content=chunked), 503, "busy", "Content-Length")
        assert in_flight_bytes(url, until=lambda n: n == 0) == 0  # the holder went away: its share is back
        assert httpx.post(f"{url}/v1/locate", content=png_bytes(700) + b"\0" * (900 << 10)).status_code == 200


def in_flight_bytes(url: str, until) -> float:
    """/metrics' gauge of request body bytes in flight, polled (a bounded number of times) until `until` holds."""
    import time

    for _ in range(300):
        text = httpx.get(f"{url}/metrics").text
        value = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("dcfeat_body_bytes "))
        if until(value):
            return value
        time.sleep(0.05)
    return value


def multipart(*parts: bytes, close: bool = True) -> tuple[bytes, dict]:
    body = b"".join(b"--XB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"%d.jpg\"\r\n"
                    b"Content-Type: image/jpeg\r\n\r\n" % i + p + b"\r\n" for i, p in enumerate(parts))
    return body + (b"--XB--\r\n" if close else b""), {"content-type": "multipart/form-data; boundary=XB"}


def test_a_truncated_multipart_body_is_400_never_a_partial_answer(client):
    body, headers = multipart(jpeg_bytes(1), jpeg_bytes(2))
    assert client.post("/v1/locate", content=body, headers=headers).status_code == 200
    cut = body[:body.index(b"--XB", 10) + 120]  # the second part's headers and a few bytes, then nothing
    assert_error(client.post("/v1/locate", content=cut, headers=headers), 400, "malformed_multipart", "truncated")
    unclosed, _ = multipart(jpeg_bytes(1), close=False)
    assert_error(client.post("/v1/locate", content=unclosed, headers=headers), 400, "malformed_multipart",
                 "closing boundary")


def reference_client_request(image: bytes, width: int, height: int) -> dict:
    """A GeoPoseReq as the OSCP GeoPose protocol's Python reference client (v2.0) writes it: every member of
    its classes serialised, `imageFormat` RGBA32 on the JPEG file's bytes, timestamps in float milliseconds."""
    privacy = {"dataRetention": [], "dataAcceptableUse": [], "dataSanitizationApplied": [],
               "dataSanitizationRequested": []}
    now = 1.7e12 + 0.5
    sensor = {"name": "", "model": "", "rigIdentifier": "", "rigRotation": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 0.0},
              "rigTranslation": {"x": 0.0, "y": 0.0, "z": 0.0}}
    return {"type": "geopose", "id": "0b5c2f7e-3c57-4c4e-9d0a-5f3c1d2e8a91", "timestamp": now,
            "sensors": [{**sensor, "type": "camera", "id": "my_camera_sensor"},
                        {**sensor, "type": "geolocation", "id": "my_gps_sensor"}],
            "sensorReadings": {
                "cameraReadings": [{"timestamp": now, "sensorId": "my_camera_sensor", "privacy": privacy,
                                    "sequenceNumber": 1, "imageFormat": "RGBA32", "size": [width, height],
                                    "imageBytes": base64.b64encode(image).decode(),
                                    "imageOrientation": {"mirrored": False, "rotation": 0.0},
                                    "params": {"model": "PINHOLE", "modelParams": [90.0, 90.0, 50.0, 40.0],
                                               "minMaxDepth": [], "minMaxDisparity": []}}],
                "geolocationReadings": [{"timestamp": now, "sensorId": "my_gps_sensor", "privacy": privacy,
                                         "latitude": 47.6, "longitude": -122.3, "altitude": 0.0, "accuracy": 0.0,
                                         "altitudeAccuracy": 0.0, "heading": 0.0, "speed": 0.0}],
                "accelerometerReadings": [], "gyroscopeReadings": [], "magnetometerReadings": [], "wifiReadings": [],
                "bluetoothReadings": []},
            "priorPoses": []}


V2 = {"Content-Type": "application/json", "Accept": "application/vnd.oscp+json; version=2.0"}


def test_the_reference_client_gets_a_geopose_at_its_path(client):
    image = jpeg_bytes(5)
    want = client.post("/scrs/geopose", json=geopose_request(image)).json()["geopose"]
    r = client.post("/geopose", content=json.dumps(reference_client_request(image, 100, 80)), headers=V2)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/vnd.oscp+json") and "version=2.0" in r.headers["content-type"]
    pose = r.json()  # GeoPoseResp, as the reference client's GeoPoseResponse.fromJson reads it: these members exactly
    assert pose["type"] == "geopose" and pose["id"] == "0b5c2f7e-3c57-4c4e-9d0a-5f3c1d2e8a91"
    assert isinstance(pose["timestamp"], (int, float))
    assert set(pose["accuracy"]) == {"position", "orientation"} and pose["accuracy"]["position"] > 0
    assert set(pose["geopose"]) == {"position", "quaternion"}
    assert set(pose["geopose"]["position"]) == {"lat", "lon", "h"} and set(pose["geopose"]["quaternion"]) == set("xyzw")
    assert pose["geopose"] == want  # the JPEG read as the JPEG it is, whatever its label says
    assert client.get("/geopose").json()["status"] == "running"


@pytest.mark.parametrize("accept, status", [("application/vnd.oscp+json;version=2.0", 200),
                                            ("application/vnd.oscp+json; version=1.0", 200),
                                            ("application/json", 200), ("*/*", 200),
                                            ("application/vnd.oscp+json; version=3.0", 400)])
def test_geopose_honours_the_protocol_version_it_is_asked_for(client, accept, status):
    r = client.post("/geopose", json=geopose_request(jpeg_bytes(5)), headers={"Accept": accept})
    if status == 200:
        assert r.status_code == 200, r.text
    else:
        body = assert_error(r, 400, "unsupported_version", "2.0", "3.0")
        assert body["type"] == "geopose" and body["id"] == "req-42"
