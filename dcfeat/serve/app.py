"""The FastAPI application of one loaded run (`create_app`): its routes (/v1/locate, GeoPose, /health, /v1/run,
/v1/cells, /metrics, the page), the queue and decoding pool they share, and the run's description and
class table that /v1/run and /v1/cells give."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dcfeat import __version__
from dcfeat.backbone import RANDOM_NOTICE
from dcfeat.errors import DcfeatError
from dcfeat.geo import utm_to_latlon
from dcfeat.localizer import Answer, Localizer
from dcfeat.serve.batcher import Batcher, Job, QueueFull
from dcfeat.serve.decoding import DecodePool, decode_all
from dcfeat.serve.geopose import GEOPOSE_MEDIA, GEOPOSE_VERSION, geopose_image, geopose_response, geopose_version
from dcfeat.serve.limits import BodyBudget, ServeConfig, read_body
from dcfeat.serve.metrics import CLIENT_CLOSED, Metrics, MetricsMiddleware
from dcfeat.serve.parsing import descriptor_request, multipart_images, parse_json, request_options
from dcfeat.serve.problems import ErrorMiddleware, Problem, error_response


def run_info(localizer: Localizer, config: ServeConfig) -> dict:
    run = localizer.run
    features, cal = run.feature_identity, run.calibration
    return {"dcfeat": __version__, "run": Path(run.directory).resolve().name, "status": localizer.status,
            "complete": run.complete, "epochs_done": run.epochs_done, "epochs": run.epochs,
            "backbone": {"model": features.model, "fingerprint": features.model_fingerprint,
                         "random": run.random_backbone, "pooling": features.pooling,
                         "image_size": features.image_size, "crop": features.crop},
            "accepts": {"images": localizer.embeds_images, "descriptors": localizer.dim},
            "notice": RANDOM_NOTICE if run.random_backbone else None,
            "preset": run.config.train.preset, "M": run.M, "N": run.config.train.N, "classes": localizer.classes,
            "scoring": localizer.scoring,
            "calibration": None if cal is None else {"threshold_m": cal.threshold_m,
                                                     "fitted_on": cal.fitted_on.to_dict()},
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
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(Problem(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}"))

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
                          f"made ({localizer.run.feature_identity.model}), so it cannot embed images: send "
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
            return error_response(e, wrap(e) if wrap else None)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED)
        except DcfeatError as e:
            return error_response(Problem(422, "bad_request", str(e)), wrap and wrap(None))
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
        return JSONResponse({"status": "ok" if ok else "worker down", "queue_images": metrics.queue_depth,
                             "pid": os.getpid()}, status_code=200 if ok else 503)

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
