"""`dcfeat serve`: a run folder behind HTTP (FastAPI + uvicorn), micro-batched, bounded, stateless.

One concept per module: `app` (the routes), `batcher` (the model's worker), `decoding` (the images' threads
and pixel budget), `parsing` (what a request says), `geopose` (the OSCP adapter), `limits` (what a client can
make the server hold), `metrics` (/metrics), `problems` (error answers), `launch` (uvicorn, workers). The
public names of each are importable from `dcfeat.serve` itself.

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
  position is the answer's, `accuracy.position` its 90 % radius; orientation and height are unknown
  (`geopose` says how the response says so, and which camera images it reads). An abstention is a 404
  error response, never a pose.
* `GET /health` (with the answering process's pid), `GET /v1/run`, `GET /v1/cells` (the class table, for the page), `GET /metrics`
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

from dcfeat.serve.app import cells, create_app, run_info
from dcfeat.serve.batcher import Batcher, Job, QueueFull
from dcfeat.serve.decoding import SMALL_DECODE_BYTES, DecodePool, decode_all
from dcfeat.serve.geopose import (GEOPOSE_MEDIA, GEOPOSE_VERSION, IDENTITY_QUATERNION, RAW_FORMATS,
                                  UNKNOWN_ORIENTATION_DEG, encoded_image, geopose_image, geopose_response,
                                  geopose_version)
from dcfeat.serve.launch import CONFIG_ENV, app_from_env, default_threads, serve_run, worker_settings
from dcfeat.serve.limits import BodyBudget, ConnectionGuard, ServeConfig, read_body, uvicorn_options
from dcfeat.serve.metrics import CLIENT_CLOSED, LATENCY_BUCKETS, Histogram, Metrics, MetricsMiddleware
from dcfeat.serve.parsing import descriptor_request, multipart_images, parse_json, request_options
from dcfeat.serve.problems import ErrorMiddleware, Problem

__all__ = ["CLIENT_CLOSED", "CONFIG_ENV", "GEOPOSE_MEDIA", "GEOPOSE_VERSION", "IDENTITY_QUATERNION", "LATENCY_BUCKETS",
           "RAW_FORMATS", "SMALL_DECODE_BYTES", "UNKNOWN_ORIENTATION_DEG", "Batcher", "BodyBudget", "ConnectionGuard",
           "DecodePool", "ErrorMiddleware", "Histogram", "Job", "Metrics", "MetricsMiddleware", "Problem", "QueueFull",
           "ServeConfig", "app_from_env", "cells", "create_app", "decode_all", "default_threads", "descriptor_request",
           "encoded_image", "geopose_image", "geopose_response", "geopose_version", "multipart_images", "parse_json",
           "read_body", "request_options", "run_info", "serve_run", "uvicorn_options", "worker_settings"]
