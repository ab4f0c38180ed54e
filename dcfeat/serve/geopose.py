"""The Open AR Cloud (OSCP) GeoPose adapter of `dcfeat serve`: a GeoPoseReq's camera image (`geopose_image`:
v2 and v1 requests, base64, encoded files whatever `imageFormat` says, raw RGBA32/GRAY8 pixels otherwise),
the protocol version an Accept header asks for (`geopose_version`), and the GeoPoseResp of an answer
(`geopose_response`). dcfeat knows no orientation and no height: the quaternion is the identity,
`accuracy.orientation` is 180 (degrees, the largest angular error there is: "unknown" in a number every
client can read) and `h` is 0, each said again in the response's `dcfeat` member."""

from __future__ import annotations

import base64
import binascii
import re
import time

from PIL import Image

from dcfeat.localizer import Answer
from dcfeat.serve.problems import Problem

# GeoPose has no way to say "orientation unknown": 180° is the largest angular error there is.
UNKNOWN_ORIENTATION_DEG = 180.0
IDENTITY_QUATERNION = {"x": 0.0, "y": 0.0, "z": 0.0, "w": 1.0}
# GeoPose camera readings whose bytes are raw pixels rather than an image file: bytes per pixel, PIL mode.
RAW_FORMATS = {"RGBA32": (4, "RGBA"), "GRAY8": (1, "L")}


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
