"""`dcfeat serve`: options of the HTTP service of one run (dcfeat.serve)."""

from __future__ import annotations

from pathlib import Path

import click

from dcfeat.choices import SCORINGS
from dcfeat.cli.common import DATA, random_backbone_model, random_backbone_option
from dcfeat.cli.options import AT_LEAST_1, FRACTION, POSITIVE, Finite, device_option
from dcfeat.errors import EnvironmentProblem


@click.command()
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=DATA / "runs" / "latest",
              show_default=True, help="Run folder written by `dcfeat train` or `dcfeat export` (only read).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface, e.g. behind a load balancer).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port to listen on.")
@device_option
@random_backbone_option("Only for a run trained on features that `dcfeat extract --random-backbone` made (the "
                        "weights' fingerprint is checked).")
@click.option("--scoring", type=click.Choice(list(SCORINGS)), default="cosine", show_default=True,
              help="How cells are ranked and given a probability, as `dcfeat predict --scoring`.")
@click.option("--database", type=click.Path(path_type=Path), default=None,
              help="A database `dcfeat index` wrote for the run: answer with the fused hybrid (as `dcfeat predict "
              "--database`); each worker opens it (memory-mapped: the pages are shared).")
@click.option("--workers", type=AT_LEAST_1, default=1, show_default=True,
              help="Processes on the port, each with its own copy of the model.")
@click.option("--max-batch", type=AT_LEAST_1, default=32, show_default=True, help="Images per forward pass.")
@click.option("--max-wait-ms", type=Finite(min=0), default=5.0, show_default=True,
              help="How long the first request of a batch waits for others to share its forward pass.")
@click.option("--max-queue", type=AT_LEAST_1, default=256, show_default=True,
              help="Images waiting for the model; a request beyond is answered 503 with Retry-After.")
@click.option("--max-images", type=AT_LEAST_1, default=32, show_default=True,
              help="Images per request; more are answered 413.")
@click.option("--max-body-mb", type=POSITIVE, default=16.0, show_default=True,
              help="Request body size in MB (2^20 bytes); larger bodies are answered 413.")
@click.option("--max-k", type=AT_LEAST_1, default=100, show_default=True, help="Most cells per answer a request may ask.")
@click.option("--timeout", "timeout_s", type=POSITIVE, default=30.0, show_default=True,
              help="Seconds to receive a request's body (408 past it), and again to answer it (504).")
@click.option("--header-timeout", "header_timeout_s", type=POSITIVE, default=10.0, show_default=True,
              help="Seconds to receive a request's headers, from its connection or its first byte; past it: 408 and "
                   "the connection closed (slow clients holding connections open).")
@click.option("--max-inflight-mb", type=POSITIVE, default=256.0, show_default=True,
              help="Request bodies being received or answered at once, together, in MB; a request whose body would "
                   "pass it is answered 503 with Retry-After before it is read (a body without Content-Length counts "
                   "as --max-body-mb). At least --max-body-mb.")
@click.option("--max-decode-mb", type=POSITIVE, default=1024.0, show_default=True,
              help="Pixel memory of the images decoding at once, in MB, as their headers say (mode and bit depth "
                   "counted); a request whose images need more is answered 413 before any is decoded.")
@click.option("--min-confidence", type=FRACTION, default=None,
              help="Abstain below this calibrated confidence when a request names none (needs a calibrated run).")
@click.option("--max-connections", type=AT_LEAST_1, default=128, show_default=True,
              help="Requests in progress per process at once (headers received, not yet answered); more are "
                   "answered 503 with Retry-After. Connections still sending their headers do not count "
                   "(--header-timeout bounds them).")
@click.option("--threads", type=AT_LEAST_1, default=None,
              help="torch threads per process for the model [default: half the cores, the rest decode and answer].")
def serve(run_dir, host, port, device, random_backbone, scoring, database, workers, max_batch, max_wait_ms, max_queue, max_images,
          max_body_mb, max_k, timeout_s, header_timeout_s, max_inflight_mb, max_decode_mb, min_confidence,
          max_connections, threads):
    """Serve a run over HTTP: POST /v1/locate (images → answers), POST /geopose and /scrs/geopose (OSCP GeoPose), a page
    at /, /health, /v1/run and /metrics (Prometheus). Requests share forward passes (micro-batching)."""
    try:
        from dcfeat.serve import ServeConfig, serve_run
    except ModuleNotFoundError as e:
        raise EnvironmentProblem(f"dcfeat serve needs {e.name}, which is not installed: pip install 'dcfeat[serve]' "
                                 "(FastAPI, uvicorn and python-multipart)") from None

    model = random_backbone_model(model_given=False, run_dir=run_dir) if random_backbone else None
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, max_images=max_images,
                         max_body_bytes=int(max_body_mb * (1 << 20)), max_k=max_k, timeout_s=timeout_s,
                         k=min(5, max_k), min_confidence=min_confidence, max_connections=max_connections,
                         header_timeout_s=header_timeout_s, max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
                         max_decode_bytes=int(max_decode_mb * (1 << 20)))
    serve_run(run_dir, host=host, port=port, device=device, scoring=scoring, model=model, config=config,
              workers=workers, threads=threads, database=database)
