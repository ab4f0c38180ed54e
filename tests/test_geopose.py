"""The OSCP GeoPose adapter of `dcfeat serve` without HTTP: a GeoPoseReq → its camera image and what it is,
the protocol version an Accept header asks for, and the GeoPoseResp of an answer."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from dcfeat.localizer import Localizer
from dcfeat.serve import Problem, encoded_image, geopose_image, geopose_response, geopose_version
from tests.conftest import jpeg_bytes

JPEG = jpeg_bytes(5)


def request(image_bytes: str, **camera) -> dict:
    """A protocol v2 GeoPoseReq with one camera reading whose imageBytes are `image_bytes` (base64 text)."""
    reading = {"sensorId": "cam0", "imageFormat": "JPG", "size": [100, 80], "imageBytes": image_bytes, **camera}
    return {"id": "req-1", "timestamp": 1700000000000, "type": "geopose",
            "sensorReadings": {"cameraReadings": [reading]}}


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize("doc", [
    request(encoded(JPEG)),
    {"id": "req-1", "sensorReadings": [{"sensorId": "cam0", "reading": {"imageBytes": encoded(JPEG)}}]},  # v1
    request("data:image/jpeg;base64," + encoded(JPEG)),
    request(base64.urlsafe_b64encode(JPEG).decode().rstrip("=")),  # URL-safe alphabet, padding left off
    request(encoded(JPEG), imageFormat="RGBA32"),  # the reference client's label for JPEG bytes
], ids=["v2", "v1", "data-url", "urlsafe-unpadded", "jpeg-labelled-rgba32"])
def test_a_geopose_request_gives_its_camera_images_file_bytes(doc):
    assert geopose_image(doc) == (JPEG, "camera reading")


@pytest.mark.parametrize("fmt, mode, depth", [("RGBA32", "RGBA", 4), ("gray8", "L", 1)])
def test_raw_pixels_are_read_as_an_image_of_their_size(fmt, mode, depth):
    pixels = np.random.default_rng(0).integers(0, 256, (80, 100, depth), dtype=np.uint8)
    image, what = geopose_image(request(encoded(pixels.tobytes()), imageFormat=fmt, size=[100, 80]))
    assert isinstance(image, Image.Image) and image.mode == mode and image.size == (100, 80)
    assert np.array_equal(np.asarray(image).reshape(80, 100, depth), pixels) and what == f"camera reading ({fmt})"


@pytest.mark.parametrize("doc, words", [
    (request(encoded(bytes(10)), imageFormat="RGBA32", size=[100, 80]), ["needs 32,000 bytes, got 10", "JPEG"]),
    (request(encoded(bytes(10)), imageFormat="GRAY8", size=None), ["needs `size` [width, height]"]),
    (request("!!" + encoded(JPEG)), ["not valid base64"]),
    (request(encoded(JPEG), imageBytes=7), ["base64 string"]),
    ({**request(encoded(JPEG)), "id": ""}, ["`id`"]),
    ({"id": "x", "sensorReadings": {"cameraReadings": [{"imageFormat": "JPG"}]}}, ["no camera reading"]),
])
def test_a_request_without_a_usable_image_is_a_422_naming_the_field(doc, words):
    with pytest.raises(Problem) as e:
        geopose_image(doc)
    assert e.value.status == 422 and e.value.code == "bad_geopose" and e.value.message.startswith("GeoPoseReq: ")
    assert all(w in e.value.message for w in words), e.value.message


def file_of(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 4)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP"])
def test_encoded_image_files_are_told_from_raw_pixels(fmt):
    assert encoded_image(file_of(fmt))
    assert not encoded_image(file_of(fmt)[1:]) and not encoded_image(bytes(64)) and not encoded_image(b"RIFF")


@pytest.mark.parametrize("accept, version", [
    ("", None),
    ("application/json", None),
    ("*/*", None),
    ("application/vnd.oscp+json", "2.0"),
    ("application/vnd.oscp+json; version=2.0", "2.0"),
    ("Application/VND.OSCP+JSON;Version=\"2\"", "2.0"),
    ("application/vnd.oscp+json; version=1.1", "1.1"),
    ("text/html, application/vnd.oscp+json; q=0.9; version=2.1", "2.1"),
])
def test_the_protocol_version_an_accept_header_asks_for(accept, version):
    assert geopose_version(accept) == version


@pytest.mark.parametrize("accept", ["application/vnd.oscp+json; version=3.0", "application/vnd.oscp+json;version=0"])
def test_another_major_version_is_a_400_naming_the_one_spoken(accept):
    with pytest.raises(Problem) as e:
        geopose_version(accept)
    assert e.value.status == 400 and e.value.code == "unsupported_version"
    assert "version=2.0" in e.value.message and accept in e.value.message


def test_the_response_of_an_answer(calibrated_run):
    localizer = Localizer.from_run(calibrated_run, device="cpu")
    feats = np.random.default_rng(3).standard_normal((1, localizer.dim)).astype(np.float32)
    [answer] = localizer.locate_features(feats, k=3)
    pose = json.loads(json.dumps(geopose_response("req-1", answer)))  # plain JSON, as it is sent
    assert set(pose) == {"id", "timestamp", "type", "accuracy", "geopose", "dcfeat"}
    assert pose["id"] == "req-1" and pose["type"] == "geopose" and isinstance(pose["timestamp"], int)
    assert pose["geopose"] == {"position": {"lat": answer.lat, "lon": answer.lon, "h": 0.0},
                               "quaternion": {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}}
    assert pose["accuracy"] == {"position": answer.radius_m, "orientation": 180.0} and answer.radius_m > 0
    assert pose["dcfeat"]["confidence"] == answer.confidence and len(pose["dcfeat"]["top_k"]) == 3
    assert "unknown" in pose["dcfeat"]["orientation"] and "unknown" in pose["dcfeat"]["height"]
