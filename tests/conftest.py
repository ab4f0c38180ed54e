"""Seeded synthetic inputs for every test: tiny DINOv2, SF-XL-named JPEGs. No network."""

import errno
import os
import time
from collections.abc import Callable
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test never waits on the hub's retries
# One thread per process: every tensor of the tests is tiny, and a second OpenMP thread only spins
# waiting for work (it doubled the suite's CPU time on 2 cores for no speed). Before torch loads, so
# that the CLI processes some tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from dcfeat.backbone import save_random_dinov2

ROOT = Path(__file__).resolve().parents[1]

# The exit code of each kind of refusal (DESIGN.md, "Errors"): one message, no traceback.
EXIT = {"bad input": 2, "damaged store": 3, "damaged run": 4, "incompatible": 5, "environment": 6}


def invoke(*args, catch_exceptions: bool = True, plots: bool = False) -> Result:
    """`dcfeat ARGS...` in-process through click's CliRunner, each argument as str().

    catch_exceptions=False lets an exception out of the command (click's default catches it into the result).
    `dcfeat evaluate` runs with --no-plots unless `plots`: its figures cost ~70 % of an evaluation's CPU, and
    only the tests that look at them ask for them.
    """
    from dcfeat.cli import cli

    args = [str(a) for a in args]
    if args[:1] == ["evaluate"] and not plots:
        args.insert(1, "--no-plots")
    return CliRunner().invoke(cli, args, catch_exceptions=catch_exceptions)


def refused(r: Result, kind: str, *words: str) -> None:
    """A refusal of the kind (a key of EXIT): its exit code, one message, no traceback, and the words in it."""
    assert r.exit_code == EXIT[kind], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # a clean exit, not a crash
    assert "Traceback" not in r.output and "Error:" in r.output, r.output
    for w in words:
        assert w in r.output, (w, r.output)


def extract_args(images, out, model, *extra) -> list:
    """`dcfeat extract` of `images` into `out` with a tiny model at 56 px, small batches and shards."""
    return ["extract", "--images", images, "--out", out, "--model", model, "--image-size", 56,
            "--workers", 0, "--batch-size", 4, "--shard-rows", 8, "--no-progress", *extra]


def assert_predict_from_images_as_from_feats(run: Path, store: Path, split: str) -> None:
    """`predict --images` on the split's photos (folder STORE_DIR/SPLIT) answers as `predict --feats`:
    the same classes, probabilities within 1e-5."""
    import polars as pl

    by_feats, by_images = store.parent / "a.parquet", store.parent / "b.parquet"
    r = invoke("predict", "--run", run, "--feats", store, "--split", split, "--out", by_feats)
    assert r.exit_code == 0, r.output
    r = invoke("predict", "--run", run, "--images", store.parent / split, "--out", by_images, "--no-progress")
    assert r.exit_code == 0, r.output
    a, b = (pl.read_parquet(p).sort("image_id", "rank") for p in (by_feats, by_images))
    assert a["class"].to_list() == b["class"].to_list()
    assert np.abs(a["probability"].to_numpy() - b["probability"].to_numpy()).max() < 1e-5


def sfxl_name(east: float, north: float, zone: int = 10, letter: str = "S", heading: int = 0) -> str:
    return f"@{east:010.2f}@{north:010.2f}@{zone}@{letter}@@@pano{int(east)}@@{heading}@@@@@@.jpg"


def write_images(folder: Path, n: int, *, seed: int = 0, size: int = 96, subdirs: int = 2,
                 shapes: list[tuple[int, int]] | None = None) -> list[Path]:
    """n JPEGs with SF-XL names spread over a few hundred metres and a few subfolders.

    `shapes`: (height, width) of image i is shapes[i % len(shapes)]; default (size, size + 16).
    """
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        east, north = 550000 + rng.uniform(0, 300), 4180000 + rng.uniform(0, 300)
        sub = folder / f"d{i % subdirs}"
        sub.mkdir(parents=True, exist_ok=True)
        height, width = shapes[i % len(shapes)] if shapes else (size, size + 16)
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        path = sub / sfxl_name(east, north, heading=int(rng.integers(0, 360)))
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(autouse=True)
def threads_as_they_were():
    """torch's and faiss' thread counts as they were before each test: a test that runs a benchmark in-process
    (scale's measure sets 2) left every later test on two OpenMP threads, which spin against each other and
    other processes on 2 busy cores (the suite's CPU time 750 s → ~200 s on a loaded machine)."""
    import sys

    import torch

    threads = torch.get_num_threads()
    faiss = sys.modules.get("faiss")
    faiss_threads = faiss.omp_get_max_threads() if faiss is not None else 1  # OMP_NUM_THREADS's, once imported
    yield
    torch.set_num_threads(threads)
    if (faiss := sys.modules.get("faiss")) is not None:
        faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random DINOv2 saved with save_pretrained, loaded through the real path."""
    return save_random_dinov2(tmp_path_factory.mktemp("model") / "tiny-dinov2", hidden_size=32, layers=2,
                              heads=2, image_size=56)


def train_tiny_run(root: Path, model: Path, *, calibrated: bool = False) -> Path:
    """A run trained from 24 rendered JPEGs (extract at 56 px, M = 200, one epoch, dim 8) in `root`/run, its
    store `root`/f.h5; `calibrated`: with a confidence fitted on 24 other images (split val) at 150 m, a
    threshold this random backbone's answers meet about half the time."""
    write_images(root / "img", 24)
    store = root / "f.h5"
    r = invoke("extract", "--images", root / "img", "--out", store, "--model", model, "--image-size", 56,
               "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    r = invoke("train", "--feats", store, "--M", 200, "--min-images-per-class", 1, "--epochs", 1, "--dim", 8,
               "--out", root / "run", "--no-progress")
    assert r.exit_code == 0, r.output
    if calibrated:
        write_images(root / "val", 24, seed=1)
        r = invoke("extract", "--images", root / "val", "--out", store, "--split", "val", "--model", model,
                   "--image-size", 56, "--workers", 0, "--no-progress")
        assert r.exit_code == 0, r.output
        from dcfeat.calibrate import calibrate_files

        calibrate_files(store, root / "run", "val", threshold_m=150.0, device="cpu")
    return root / "run"


@pytest.fixture(scope="session")
def tiny_run(tiny_model, tmp_path_factory) -> Path:
    """An uncalibrated run of the tiny random DINOv2 (`train_tiny_run`); copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny-run"), tiny_model)


@pytest.fixture(scope="session")
def calibrated_run(tiny_model, tmp_path_factory) -> Path:
    """`tiny_run` with a calibration.json (`train_tiny_run(calibrated=True)`); copy it before changing it."""
    return train_tiny_run(tmp_path_factory.mktemp("calibrated-run"), tiny_model, calibrated=True)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    write_images(folder, 24)
    return folder


@pytest.fixture(scope="session")
def city_store(tmp_path_factory) -> Path:
    """The SMALL synthetic city as a format-v1 store: train 2600, val 100, test 200, test-db 1320 rows."""
    from dcfeat.synthetic.features import SMALL, make_city, write_city

    store = tmp_path_factory.mktemp("city") / "feats.h5"
    write_city(make_city(seed=0, **SMALL), store)
    return store


# Settings of the measured margins in the tests: 6 epochs of 10 steps, 128 dims, m = 0.4, head lr 1e-2.
FAST_TRAIN = ["--epochs", "6", "--dim", "128", "--m", "0.4", "--lr-heads", "1e-2", "--no-progress"]


@pytest.fixture(scope="session")
def city_run(city_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    r = invoke("train", "--feats", city_store, "--val-split", "val", "--out", out, *FAST_TRAIN,
               catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return out


def run_dcfeat_quietly(args: list[str]) -> None:
    """`dcfeat ARGS...` with its output thrown away: what a process that `kill_9_when` starts runs."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from dcfeat.cli import main

    main(args)


@pytest.fixture(scope="session")
def forks():
    """multiprocessing's forkserver with the package, torch and transformers imported once: a process it
    starts costs its own work, where a new interpreter spent ~4 s of CPU importing them first. (Plain
    fork() is no option: polars' thread pool hangs in a child forked after its first query.) The server
    is stopped and waited for at the end, so the CPU time of it and its children counts in the suite's."""
    import multiprocessing
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.conftest", "dcfeat.cli", "dcfeat.extract", "dcfeat.train",
                                    "transformers.models.dinov2.modeling_dinov2"])
    yield context
    stop = getattr(forkserver._forkserver, "_stop", None)  # the standard library's one way to stop it and
    if stop is not None:  # wait for it (private: a Python without it leaves the server to end with pytest)
        stop()


def kill_9_when(forks, args: list, ready: Callable[[], bool], timeout_s: float = 120,
                target: Callable[[list[str]], None] = run_dcfeat_quietly) -> None:
    """Run `dcfeat ARGS...` (or `target(ARGS)`, a module-level function) in its own process, started by
    the `forks` fixture, and kill -9 it once `ready()` holds: no handler runs, nothing is flushed or
    cleaned up. Returns without killing if it ends first; gives up waiting for `ready` after `timeout_s`."""
    proc = forks.Process(target=target, args=([str(a) for a in args],))
    proc.start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.is_alive() and not ready():
        time.sleep(0.005)
    proc.kill()
    proc.join()


@contextmanager
def live_server(app, **options):
    """A real uvicorn serving `app` on 127.0.0.1 at a free port (its socket bound here first), in a
    thread, with uvicorn `options` (dcfeat.serve.uvicorn_options: what `dcfeat serve` runs with); yields
    the base URL and stops the server on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


@pytest.fixture
def fake_mount(monkeypatch):
    """fake_mount(folder, size=None): what Python writes under `folder` (open() for writing, Path.mkdir; not
    what a C library or os.open writes) fails as on a filesystem mounted there: read-only (EROFS) when `size`
    is None (root's chmod would not refuse), else one of `size` bytes in all, where a write that does not fit
    raises ENOSPC midway as a full tmpfs does. Call it again to resize. Nothing is mounted: a test must not
    change the host."""
    import builtins
    import io
    import pathlib

    sizes: dict[str, int | None] = {}
    real_open, real_mkdir = builtins.open, pathlib.Path.mkdir

    def mounted(path) -> str | None:
        path = os.path.abspath(path)
        return next((f for f in sizes if path == f or path.startswith(f + os.sep)), None)

    class OnSmallMount:
        """A file open for writing under a mount of some size: a write that does not fit is refused."""

        def __init__(self, file, folder: str):
            self._file, self._folder = file, folder

        def write(self, data):
            self._file.flush()
            used = sum(p.stat().st_size for p in Path(self._folder).rglob("*") if p.is_file())
            if used + len(data) > sizes[self._folder]:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a write's error names no file
            return self._file.write(data)

        def __getattr__(self, name):
            return getattr(self._file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._file.__exit__(*exc)

    def open_(file, mode="r", *args, **kwargs):
        writes = isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+")
        folder = mounted(file) if writes else None
        if folder is not None and sizes[folder] is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        opened = real_open(file, mode, *args, **kwargs)
        return opened if folder is None else OnSmallMount(opened, folder)

    def mkdir(self, *args, **kwargs):
        folder = mounted(self)
        if folder is not None and sizes[folder] is None and not self.exists():
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)

    def mount(folder: Path, size: int | None = None) -> None:
        sizes[os.path.abspath(folder)] = size

    return mount


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (80, 100)) -> bytes:
    """A random-pixel JPEG (height, width) in memory."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def hostile_image_bytes(kind: str) -> bytes:
    """A file of a format dcfeat does not read, as an upload or a mislabelled photo brings it: "dds" (an
    unknown pixel format: PIL raises NotImplementedError), "spider" (a stack header that PIL's reader
    trips on: AttributeError) or "eps" (PostScript: PIL hands it to Ghostscript)."""
    import io
    import struct

    if kind == "dds":
        header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 8, 8, 0, 0, 0) + bytes(44)
        pixel_format = struct.pack("<II4sIIIII", 32, 0x4, b"XXXX", 0, 0, 0, 0, 0)
        return header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(256)
    buffer = io.BytesIO()
    if kind == "spider":
        Image.new("F", (8, 8)).save(buffer, "SPIDER")
        data = bytearray(buffer.getvalue())
        data[26 * 4:27 * 4] = struct.pack("<f", 1.0)  # an image number without a stack
        return bytes(data)
    Image.new("RGB", (8, 8)).save(buffer, "EPS")
    return buffer.getvalue()


HOSTILE_KINDS = ("dds", "spider", "eps")
