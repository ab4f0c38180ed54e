"""Running `dcfeat serve`: `serve_run` (load the run and its backbone, then uvicorn: one process, or
`workers` processes on one port, each building its app with `app_from_env` from the settings in
DCFEAT_SERVE, which `worker_settings` writes) and the model's torch threads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI

from dcfeat.localizer import Localizer
from dcfeat.serve.app import create_app
from dcfeat.serve.limits import ServeConfig, uvicorn_options


CONFIG_ENV = "DCFEAT_SERVE"  # the worker processes' settings, as JSON (uvicorn --workers imports the factory)


def default_threads() -> int:
    """torch's intra-op threads for the model: half the cores, the rest decoding and answering HTTP. On a
    2-core CPU one thread runs a batch 4-40× faster than two when the cores are busy (OpenMP threads
    spinning against the decoders)."""
    return max(1, (os.cpu_count() or 2) // 2)


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or default_threads())


def worker_settings(run_dir: Path, *, device: str, scoring: str, model: str | None, threads: int | None,
                    config: ServeConfig, database: Path | None) -> str:
    """What `serve_run` hands each worker process in CONFIG_ENV (JSON), read back by `app_from_env`."""
    return json.dumps({"run": str(Path(run_dir).resolve()), "device": device, "scoring": scoring, "model": model,
                       "threads": threads, "config": asdict(config),
                       "database": str(Path(database).resolve()) if database else None})


def app_from_env() -> FastAPI:
    """The app of one worker process of `dcfeat serve --workers N` (settings from the environment)."""
    settings = json.loads(os.environ[CONFIG_ENV])
    _set_threads(settings.get("threads"))
    localizer = Localizer.from_run(settings["run"], device=settings["device"], scoring=settings["scoring"],
                                   model=settings["model"], database=settings.get("database"))
    localizer.load_backbone()  # load and check it before the first request
    return create_app(localizer, ServeConfig(**settings["config"]))


def serve_run(run_dir: Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
              scoring: str = "cosine", model: str | None = None, config: ServeConfig | None = None,
              workers: int = 1, threads: int | None = None, log_level: str = "info",
              database: Path | None = None) -> None:
    """`dcfeat serve`: load the run and its backbone (refusing a damaged run before listening), then
    serve it with uvicorn until interrupted; `workers` > 1 runs that many processes on one port. `model`:
    another copy of the run's backbone (the Localizer's); `database`: the fused hybrid's (`dcfeat index`)."""
    import uvicorn

    config = config or ServeConfig()
    _set_threads(threads)
    localizer = Localizer.from_run(run_dir, device=device, scoring=scoring, model=model, database=database)
    localizer.load_backbone()
    if config.min_confidence is not None:
        localizer.check_min_confidence(config.min_confidence)
    options = {"host": host, "port": port, "log_level": log_level, "timeout_graceful_shutdown": 5,
               **uvicorn_options(config)}
    if workers == 1:
        uvicorn.run(create_app(localizer, config), **options)
        return
    del localizer
    os.environ[CONFIG_ENV] = worker_settings(run_dir, device=device, scoring=scoring, model=model, threads=threads,
                                             config=config, database=database)
    # A worker answers uvicorn's health pings only once it has unpickled its settings, which imports dcfeat.serve
    # and torch: ~3 s of CPU, more than uvicorn's 5 s default on busy cores, where every worker was killed and
    # started again, forever. A worker that hangs is still replaced, after a minute.
    uvicorn.run("dcfeat.serve:app_from_env", factory=True, workers=workers, timeout_worker_healthcheck=60, **options)
