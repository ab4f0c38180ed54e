"""What a `dcfeat serve` request says, read and checked (a Problem naming what is wrong otherwise): the
`k` and `min_confidence` fields, a multipart body's images and fields, a JSON body, and /v1/locate's
descriptor form. Body parsers run in threads, off the event loop."""

from __future__ import annotations

import json
import math

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from dcfeat.localizer import Localizer
from dcfeat.serve.limits import ServeConfig
from dcfeat.serve.problems import Problem


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
