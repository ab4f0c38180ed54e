"""`Localizer`: a trained run put to work, the one core that `predict`, `serve` and notebooks call.

    from dcfeat import Localizer
    loc = Localizer.from_run("data/runs/latest", device="auto")
    answers = loc.locate(["a.jpg", pil_image, jpeg_bytes])   # one Answer per image
    frame = loc.locate(["a.jpg"], as_frame=True)              # predict's long table (polars)
    answers = loc.locate_features(features)                   # cached backbone features (n, dim)

Images go through the backbone, pooling, size and crop of the run's training features
(checked by the weights' fingerprint) and the run's tuned blocks where it has them, then
the run's classifier. Every answer is read off the one table `predictions()` makes (one
row per image and rank): the answer is its rank-1 row, the top-k its rows. What that table
holds (each answer's position, and the centre of the cell it answers) is what an `Answer`
says; nothing here derives a position of its own.

Two numbers per answer: `probability` ranks the cells (a softmax over every cell's score;
the rank-1 cell can hold most of the mass and still be wrong), `confidence` is the
calibrated probability that the rank-1 answer lies within `threshold_m` of where the photo
was taken (fitted on a held-out split), with `radius_m` the radius that holds the true
position with probability 0.9. Both are empty for an uncalibrated run, and under a `scoring`
the run's calibration was not fitted for (it is fitted for cosine: `--scoring group-softmax`
answers carry none, and `min_confidence` is refused).
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageOps

from dcfeat.backbone import FrozenBackbone, load_backbone
from dcfeat.choices import NO_POOLING
from dcfeat.confidence import TOP_K, answer_rule, calibration_for, fused_for_features, scoring_note, signals_of
from dcfeat.database import CellDatabase
from dcfeat.devices import resolve_device
from dcfeat.errors import BadInput, IncompatibleFeatures
from dcfeat.finetune import use_tuned_blocks
from dcfeat.fusion import CANDIDATES
from dcfeat.geo import Places, utm_to_latlon
from dcfeat.identity import check_features, model_source
from dcfeat.images import MAX_PIXELS, Crops, ImageDataset, ImageProblem, collate, decoding_workers, load_image
from dcfeat.partition import centres_of
from dcfeat.metrics import THRESHOLD_M
from dcfeat.model import Scores, top_cells
from dcfeat.positions import answer as positions_answer
from dcfeat.positions import ranked, weighing_scale
from dcfeat.progress import progress_bar
from dcfeat.run import Run, load_run, open_database

# What `locate` takes per image: a file path, the encoded bytes of an image file, a PIL image,
# or an (H, W, 3) uint8 array.
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]
# Columns of predictions() that hold one value per image (repeated on its every rank); the others
# describe the ranked cell and go into an answer's top_k. `error_m` is predict's (where the truth is known).
IMAGE_COLUMNS = ("image_id", "confidence", "radius_m", "abstained", "threshold_m", "run_status", "error_m")
_IN_MEMORY = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
# PIL modes its TIFF writer cannot write, and the mode each is written in instead (what `_to_rgb` would make
# of it anyway: premultiplied alpha unpremultiplied, HSV/LAB as RGB).
_TIFF_INSTEAD = {"RGBa": "RGBA", "La": "LA", "HSV": "RGB", "LAB": "RGB", "I;16B": "I", "I;16L": "I", "I;16N": "I"}
# A run folder exported with its backbone (`dcfeat export --with-backbone`) keeps it here.
BACKBONE_DIR = "backbone"


def embed_images(paths: list[Path], backbone: FrozenBackbone, image_size: int, *, crop: str = "centre",
                 batch_size: int = 64, workers: int | None = 0,
                 progress: bool = True) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """Backbone features of image files: (features of the readable ones, their indices into `paths`,
    [(index, reason)] of the rest). `crop`: as the features were extracted (dcfeat.images.CROPS).
    `workers` None: decoding processes by `images.decoding_workers`."""
    dataset = ImageDataset(paths, image_size, crop=crop, patch_size=backbone.patch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                                         num_workers=decoding_workers(workers, len(paths), batch_size))
    feats, kept, failed = [], [], []
    with progress_bar("embed", len(paths), enabled=progress) as advance:
        for indices, crops, bad in loader:
            if crops is not None:
                feats.append(crops.map(backbone.embed).cpu().numpy())
                kept.extend(indices)
            failed.extend(bad)
            advance(len(indices) + len(bad))
    dim = backbone.dim
    return (np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)), kept, failed


def run_status(run: Run, scoring: str = "cosine") -> str:
    """What made a run's answers, in a word or a few: `complete`, or the warnings that go with them (under
    a `scoring` its calibration was not fitted for, that it gives no confidence)."""
    notes = [f"INCOMPLETE RUN (epoch {run.epochs_done} of {run.epochs})" if not run.complete else "complete"]
    if run.random_backbone:
        notes.append("RANDOM BACKBONE")
    if run.calibration is None:
        notes.append("UNCALIBRATED")
    elif calibration_for(run.calibration, scoring) is None:
        notes.append(f"NO CONFIDENCE UNDER {scoring.upper()} SCORING (calibration fitted for {run.calibration.scoring} "
                     "scoring)")
    return "; ".join(notes)


def scores_for(run: Run, features: np.ndarray, k: int, scoring: str = "cosine") -> Scores:
    """The one scoring of every cell that `predictions` answers `k` cells per image from: a pass made for
    the largest k of a batch serves each smaller k too."""
    wide = scoring == "cosine" and _wide(run, k) and len(features) > 0
    return run.model.score(features, max(k, TOP_K), scoring=scoring, softmax=wide)


def _wide(run: Run, k: int) -> bool:
    """Whether k answers are more cells than the signals' top cells (answered by the softmax over every cell)."""
    return k > min(TOP_K, sum(run.model.heads.classes_per_group))


def predictions(run: Run, image_ids: list[str], features: np.ndarray, k: int, scoring: str = "cosine",
                scores: Scores | None = None) -> pl.DataFrame:
    """Long table: one row per image and rank with the answer there (UTM and lat/lon: dcfeat.positions, under
    the run's rule; rank 1 the position, ranks 2.. other cells' centres), the cell it answers, its
    probability and its centre, and per image the
    calibrated confidence and the 90 % radius (null for an uncalibrated run), the threshold the
    confidence means, and the run's status.

    One ranking feeds the answers, their positions, confidence and radius. Under `scoring` "cosine" the
    probability is the softmax over every cell at scale s. Under "group-softmax" it is each cell's probability
    within its own group, and the positions are weighed by those probabilities normalised over the top cells,
    exactly as `dcfeat evaluate --scoring group-softmax` answers (evaluate.classify); the run's calibration
    was fitted for cosine answers (`confidence.calibration_for`), so these answers carry no confidence and no
    radius, follow DEFAULT_RULE, and the status says so. `scores`: `scores_for` these features at this k
    or a larger one, under this `scoring` (made here when None)."""
    cal = calibration_for(run.calibration, scoring)
    rule = answer_rule(cal)
    threshold_m = cal.threshold_m if cal else THRESHOLD_M
    n = len(features)
    confidence, radius = np.full(n, np.nan), np.full(n, np.nan)
    # One scoring of every cell ranks the answers and gives the signals (of the top TOP_K cells).
    scores = scores if scores is not None else scores_for(run, features, k, scoring)
    if scoring == "cosine":
        wide = _wide(run, k) and n > 0
        sig = signals_of(scores.head(TOP_K), run.classes, M=run.M, rule=rule)
        if not wide:
            ids, probs = sig.top_classes, sig.scores.softmax_top(sig.top_classes.shape[1]).astype(np.float32)
            cells, weights = sig.centres, sig.weights
        else:  # a softmax at scale s over every class of every group
            ids, probs = scores.top_classes[:, :k], scores.softmax[:, :k]
            cells, weights = centres_of(run.classes, ids), probs
        # Rank 1 is the signals' answer, the best cell's position (both rankings share their best cell); ranks
        # 2.. the cells dcfeat.positions.ranked orders (one row per answer).
        a = sig.answer
        first = Places(*(np.asarray(v)[:, None] for v in (a.east, a.north, a.zone, a.letter)))
        at, index = ranked(first, cells, weights, k, threshold_m)
        if cal is not None and n:
            confidence, radius = cal.confidence(sig.values), cal.radius_m(sig.base_radius_m)
    else:  # the scores are log group probabilities: evaluate.classify's answers
        top = top_cells(run.model, features, run.classes, max(k, TOP_K), scoring, scores=scores)
        ids, probs = top["class"], np.exp(top["score"]).astype(np.float32)
        at, index = positions_answer(Places(top["east"], top["north"], top["zone"], top["letter"]), top["score"],
                                     weighing_scale(run.model.heads.logit_scale, scoring), rule, ranks=k,
                                     threshold_m=threshold_m)
    ids, probs = np.take_along_axis(ids, index, 1), np.take_along_axis(probs, index, 1)
    kk = ids.shape[1]
    flat = ids.reshape(-1)
    cells = centres_of(run.classes, ids)
    c = Places(*(np.asarray(a).reshape(-1) for a in (cells.east, cells.north, cells.zone, cells.letter)))
    east, north = at.east.reshape(-1), at.north.reshape(-1)
    zone, letter = np.asarray(at.zone).reshape(-1), np.asarray(at.letter).reshape(-1)
    lat, lon = utm_to_latlon(east, north, zone, letter) if n else (east, north)
    per_image = lambda v: np.repeat(v, kk)  # noqa: E731
    return pl.DataFrame({
        "image_id": np.repeat(np.asarray(image_ids, dtype=object), kk), "rank": np.tile(np.arange(1, kk + 1), n),
        "class": flat.astype(np.int64), "group": run.classes["group"].to_numpy()[flat], "probability": probs.reshape(-1),
        "utm_east": east, "utm_north": north, "utm_zone": zone, "utm_letter": _strings(letter), "lat": lat,
        "lon": lon, "cell_east": c.east, "cell_north": c.north, "cell_zone": c.zone, "cell_letter": _strings(c.letter),
        "confidence": per_image(confidence), "radius_m": per_image(radius),
    }).with_columns(pl.col("confidence", "radius_m").fill_nan(None),
                    threshold_m=pl.lit(cal.threshold_m if cal else None, pl.Float64),
                    run_status=pl.lit(run_status(run, scoring)))


def _strings(values: np.ndarray) -> np.ndarray:
    """Strings (band letters) as a table's column takes them: polars reads a numpy array of Python strings
    ~8× faster than a unicode one (0.0002 against 0.0016 ms per query at k=5)."""
    return np.asarray(values).astype(object)


def fused_predictions(run: Run, database: CellDatabase, image_ids: list[str], features: np.ndarray,
                      k: int) -> pl.DataFrame:
    """predictions()'s table from the fused hybrid (dcfeat.fusion) searching `database`: rank 1 the weighted
    centroid of the best-supported neighbourhood of the candidate photos, ranks 2.. other photos' places; per
    rank the class of the photo answered (its cell's centre), the photo's weight as `probability` and its id
    (`database_image`); the confidence and 90 % radius of the fused answers where the run's calibration fitted
    them (cosine scoring only: the fused rule weighs cosine posteriors)."""
    n = len(features)
    out, fc = fused_for_features(run.model, run.classes, run.M, calibration_for(run.calibration, "cosine"), database,
                                 features, k)
    confidence, radius = ((fc.confidence.confidence(out.values), fc.confidence.radius_m(out.base_radius_m)) if fc
                          and n else (np.full(n, np.nan), np.full(n, np.nan)))
    take = lambda a: np.take_along_axis(a, out.index, 1)  # noqa: E731
    rows, ids, probs = take(out.candidates.rows), take(out.candidates.cells), take(out.weights).astype(np.float32)
    kk = ids.shape[1]
    safe = np.maximum(ids, 0).reshape(-1)
    cells = centres_of(run.classes, safe)
    none = ids.reshape(-1) < 0
    east, north = out.at.east.reshape(-1), out.at.north.reshape(-1)
    zone, letter = np.asarray(out.at.zone).reshape(-1), np.asarray(out.at.letter).reshape(-1)
    lat, lon = utm_to_latlon(east, north, zone, letter) if n else (east, north)
    per_image = lambda v: np.repeat(v, kk)  # noqa: E731
    status = run_status(run) + ("" if fc else "; FUSED ANSWERS UNCALIBRATED (calibrate with --database-split)")
    return pl.DataFrame({
        "image_id": np.repeat(np.asarray(image_ids, dtype=object), kk), "rank": np.tile(np.arange(1, kk + 1), n),
        "class": np.where(none, -1, safe), "group": np.where(none, -1, run.classes["group"].to_numpy()[safe]),
        "probability": probs.reshape(-1), "utm_east": east, "utm_north": north, "utm_zone": zone,
        "utm_letter": _strings(letter), "lat": lat, "lon": lon, "cell_east": np.where(none, np.nan, cells.east),
        "cell_north": np.where(none, np.nan, cells.north), "cell_zone": cells.zone,
        "cell_letter": _strings(cells.letter),
        "database_image": database.ids(rows.reshape(-1)), "confidence": per_image(confidence),
        "radius_m": per_image(radius),
    }).with_columns(pl.col("confidence", "radius_m", "utm_east", "utm_north", "lat", "lon", "cell_east",
                           "cell_north").fill_nan(None),
                    threshold_m=pl.lit(fc.confidence.threshold_m if fc else None, pl.Float64),
                    run_status=pl.lit(status))


def abstain(frame: pl.DataFrame, min_confidence: float | None) -> pl.DataFrame:
    """Mark images whose confidence is below `min_confidence` (`abstained`); they stay in the table."""
    below = pl.col("confidence") < min_confidence if min_confidence is not None else pl.lit(False)
    return frame.with_columns(abstained=below.fill_null(False))


def json_value(v):
    """A JSON-safe scalar: NaN and infinities (not valid JSON) become None, numpy scalars Python ones."""
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


@dataclass(frozen=True)
class Answer:
    """Where one photo was taken, as the run answers it.

    The position is the rank-1 row of `predictions()`: its `utm_east`/`utm_north` where the table
    gives a position, else the rank-1 cell's centre; `lat`/`lon` are the table's. `top_k` holds the
    ranked answers (rank 1 the position, then other places: dcfeat.positions.ranked), each with every
    per-rank column of the table (rank, the class answered, group,
    probability, cell centre, lat/lon). `error` says why an image could not be used (then every
    other field is empty).
    """

    image_id: str
    lat: float | None = None
    lon: float | None = None
    utm_east: float | None = None
    utm_north: float | None = None
    utm_zone: int | None = None
    utm_letter: str | None = None
    confidence: float | None = None
    radius_m: float | None = None
    abstained: bool = False
    threshold_m: float | None = None
    run_status: str | None = None
    top_k: list[dict] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Answer:
        """The answer of one image from its rows of the table, rank order."""
        first = rows[0]
        east = first.get("utm_east", first.get("cell_east"))
        north = first.get("utm_north", first.get("cell_north"))
        return cls(image_id=str(first["image_id"]), lat=json_value(first.get("lat")), lon=json_value(first.get("lon")),
                   utm_east=json_value(east), utm_north=json_value(north), utm_zone=json_value(first.get("utm_zone")),
                   utm_letter=first.get("utm_letter"), confidence=json_value(first.get("confidence")),
                   radius_m=json_value(first.get("radius_m")), abstained=bool(first.get("abstained", False)),
                   threshold_m=json_value(first.get("threshold_m")), run_status=first.get("run_status"),
                   top_k=[{c: json_value(v) for c, v in r.items() if c not in IMAGE_COLUMNS} for r in rows])

    def to_dict(self) -> dict:
        """The answer as JSON-ready data (what `dcfeat serve` returns per image)."""
        return {"image": self.image_id, "lat": self.lat, "lon": self.lon,
                "utm": {"east": self.utm_east, "north": self.utm_north, "zone": self.utm_zone,
                        "letter": self.utm_letter},
                "confidence": self.confidence, "radius_m": self.radius_m, "abstained": self.abstained,
                "threshold_m": self.threshold_m, "run_status": self.run_status, "top_k": self.top_k,
                **({"error": self.error} if self.error is not None else {})}


def answers(frame: pl.DataFrame) -> list[Answer]:
    """One Answer per image of a predictions() table, in its order (a new image starts at rank 1, so
    two images with one id stay two answers)."""
    out, rows = [], []
    for row in frame.iter_rows(named=True):
        if row["rank"] == 1 and rows:
            out.append(Answer.from_rows(rows))
            rows = []
        rows.append(row)
    if rows:
        out.append(Answer.from_rows(rows))
    return out


def _image_id(image: ImageInput, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, Image.Image) and getattr(image, "filename", ""):
        return str(image.filename)
    return f"#{i}"


def _as_file(image: ImageInput):
    """What `load_image` opens: a path, or the image file in memory (a PIL image or array is written
    losslessly as TIFF, after the EXIF rotation that opening its file would apply)."""
    if isinstance(image, (str, os.PathLike)):
        return Path(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ImageProblem(f"an array must be (H, W, 3) or (H, W) uint8, not {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ImageProblem(f"empty: {image.width}x{image.height} pixels")
        if image.mode in _TIFF_INSTEAD:
            image = image.convert(_TIFF_INSTEAD[image.mode])
        buffer = io.BytesIO()
        try:
            ImageOps.exif_transpose(image).save(buffer, format="TIFF")
        except (OSError, ValueError) as e:  # a mode no writer knows
            raise ImageProblem(f"a PIL image of mode {image.mode} cannot be used: {e}") from None
        buffer.seek(0)
        return buffer
    raise ImageProblem(f"not an image: {type(image).__name__} (pass a path, the bytes of an image file, a PIL image "
                       "or an (H, W, 3) uint8 array)")


class Localizer:
    """A run folder loaded once, answering where photos (or their cached features) were taken.

    The backbone loads on the first image (`locate_features` needs none) and is checked against
    the run's training features by its weights' fingerprint. A run of descriptors no dcfeat
    backbone made (`dcfeat import`, synthetic cities) has none: it answers `locate_features` only,
    and refuses images naming that (`embeds_images`, `check_images`). `model`: another copy of the same
    backbone (a local folder); default the run's exported `backbone/` folder if it has one, else
    the backbone the run's features came from. Thread-safe: one forward pass at a time.
    """

    def __init__(self, run: Run, *, device: str | torch.device | None = None, model: str | None = None,
                 scoring: str = "cosine", k: int = 5, batch_size: int = 64, workers: int = 0,
                 database: CellDatabase | str | os.PathLike | None = None):
        self.run = run
        if database is not None and scoring != "cosine":
            raise BadInput(f"--database with --scoring {scoring}: the fused hybrid weighs the cells' cosine "
                           "posteriors; leave --scoring out")
        # The fused hybrid's database (`dcfeat index`): answers come from its photos weighed with the cells.
        self.database = (open_database(Path(database), run, None) if isinstance(database, (str, os.PathLike))
                         else database)
        self.device = resolve_device(device) if device is not None else run.model.device
        self.model = model
        self.scoring = scoring
        self.k = k
        self.batch_size = batch_size
        self.workers = workers
        self._backbone: FrozenBackbone | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, device: str = "auto", **options) -> Localizer:
        """Load a run folder written by `dcfeat train` (or exported by `dcfeat export`), checked file by file."""
        dev = resolve_device(device)
        return cls(load_run(Path(run_dir), dev), device=dev, **options)

    # What the run is.
    @property
    def image_size(self) -> int:
        return int(self.run.feature_identity.image_size)

    @property
    def crop(self) -> str:
        return self.run.feature_identity.crop

    @property
    def dim(self) -> int:
        """Values per descriptor that `locate_features` takes: the width of the run's training features."""
        return self.run.feature_identity.dim

    @property
    def calibrated(self) -> bool:
        """Whether answers carry a confidence and a radius: the run has a calibration fitted for this scoring (and
        for the fused answers, where a database is searched)."""
        cal = calibration_for(self.run.calibration, self.scoring)
        return cal is not None and (self.database is None or cal.fused is not None)

    @property
    def scoring_note(self) -> str | None:
        """Why a calibrated run's answers carry no confidence under this scoring (None where they do)."""
        return scoring_note(self.run.calibration, self.scoring)

    @property
    def random_backbone(self) -> bool:
        return self.run.random_backbone

    @property
    def status(self) -> str:
        return run_status(self.run, self.scoring)

    @property
    def classes(self) -> int:
        return self.run.classes.height

    @property
    def backbone_source(self) -> str:
        """The checkpoint `backbone` loads: `model`, the run's own `backbone/` folder, or the features' backbone."""
        features = self.run.feature_identity
        exported = Path(self.run.directory) / BACKBONE_DIR
        if self.model:
            return self.model
        if exported.is_dir():
            return str(exported)
        return model_source(features.attrs())

    @property
    def embeds_images(self) -> bool:
        """Whether photos can be embedded for this run: its features came from a backbone dcfeat loads, not
        from another tool (`dcfeat import`) or a synthetic city. Without one it answers descriptors only."""
        return self.run.feature_identity.pooling != NO_POOLING

    def check_images(self) -> None:
        """Refuse photos, naming what to send instead, where the run has no backbone to embed them."""
        if not self.embeds_images:
            raise BadInput(f"the run {self.run.directory} was trained on descriptors that no dcfeat backbone made "
                           f"({self.run.feature_identity.model}), so it cannot embed photos. Compute their "
                           "descriptors with the tool that made the training ones, then `dcfeat import --unlabelled "
                           "--split SPLIT` them and `dcfeat predict --feats STORE --split SPLIT`, or send them to "
                           "`dcfeat serve` as JSON {\"descriptors\": [[...], ...]} (Localizer.locate_features)")

    def load_backbone(self) -> None:
        """Load and check the backbone now where the run has one (a server, before its first request)."""
        if self.embeds_images:
            _ = self.backbone

    @property
    def backbone(self) -> FrozenBackbone:
        """The run's backbone (with its tuned blocks), loaded and checked on first use."""
        self.check_images()
        if self._backbone is not None:  # no lock: decoding threads ask for its patch size during forward passes
            return self._backbone
        with self._lock:
            if self._backbone is None:
                features, source = self.run.feature_identity, self.backbone_source
                backbone = load_backbone(source, pooling=features.pooling, device=str(self.device))
                try:
                    check_features(features, {"model_fingerprint": backbone.fingerprint, "pooling": backbone.pooling,
                                              "dim": backbone.dim}, what=f"backbone '{source}'")
                except IncompatibleFeatures as e:
                    if not backbone.random_init:
                        raise
                    raise IncompatibleFeatures(
                        f"{e}. '{source}' is a randomly initialised backbone, and not the one this run's features "
                        "came from: a random backbone answers only for a run trained on features it made itself "
                        "(`dcfeat extract --random-backbone`, then `dcfeat train`)") from None
                if self.run.finetune_blocks:
                    use_tuned_blocks(backbone, self.run)
                self._backbone = backbone
            return self._backbone

    def check_min_confidence(self, min_confidence: float | None) -> None:
        """Refuse an abstention threshold the run cannot apply (no calibration) or that means nothing."""
        if min_confidence is None:
            return
        if isinstance(min_confidence, bool) or not (isinstance(min_confidence, (int, float, np.floating))
                                                    and 0 < min_confidence <= 1):
            raise BadInput(f"min_confidence {min_confidence!r}: a probability in (0, 1] is expected")
        if self.run.calibration is None:
            raise BadInput(f"--min-confidence needs a calibrated run, and {self.run.directory} has no "
                           f"calibration.json: fit one with `dcfeat calibrate --run {self.run.directory} --split val`")
        if not self.calibrated:
            raise BadInput(f"--min-confidence needs a confidence, and {self.scoring_note}")

    # Images → features.
    def decode(self, image: ImageInput, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """One image as the backbone takes it: uint8 (H, W, 3) at the run's size and crop; ImageProblem
        (with the reason) for one that cannot be used (not an image, truncated, more than `max_pixels`)."""
        try:
            return load_image(_as_file(image), self.image_size, crop=self.crop, patch_size=self.backbone.patch_size,
                              max_pixels=max_pixels)
        except ImageProblem as e:  # PIL names an in-memory file by its repr: say what it is instead
            raise ImageProblem(_IN_MEMORY.sub("(the bytes given)", str(e))) from None

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Backbone features (n, dim) float32 of decoded images: one forward pass per image shape."""
        if not images:
            return np.zeros((0, self.backbone.dim), np.float32)
        with self._lock:
            return Crops.stack([torch.from_numpy(np.ascontiguousarray(x)) for x in images]).map(
                self.backbone.embed).cpu().numpy()

    def embed_files(self, paths: list[Path], *, batch_size: int | None = None, workers: int | None = None,
                    progress: bool = False) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
        """`embed_images` with this run's backbone, size and crop: (features, kept indices, [(index, reason)])."""
        with self._lock:
            return embed_images(paths, self.backbone, self.image_size, crop=self.crop,
                                batch_size=batch_size or self.batch_size,
                                workers=self.workers if workers is None else workers, progress=progress)

    def check_k(self, k) -> int:
        """Cells per answer: `k`, or the Localizer's own when None; BadInput naming it unless a whole number >= 1."""
        if k is None:
            return self.k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise BadInput(f"k={k!r}: cells per answer must be a whole number >= 1")
        return int(k)

    # Features → answers.
    def scores(self, features: np.ndarray, k: int) -> Scores:
        """One scoring of these features' cells that `table` answers every k up to `k` from."""
        with self._lock:
            return scores_for(self.run, np.asarray(features, dtype=np.float32), self.check_k(k), self.scoring)

    def table(self, features: np.ndarray, image_ids: list[str], *, k: int | None = None,
              min_confidence: float | None = None, scores: Scores | None = None) -> pl.DataFrame:
        """predictions() of backbone features, with `abstained` (below `min_confidence`); `scores`: `scores`
        of these features at this k or a larger one (made here when None)."""
        self.check_min_confidence(min_confidence)
        k = self.check_k(k)
        features = np.asarray(features, dtype=np.float32)
        dim = self.dim
        if features.ndim != 2 or features.shape[1] != dim:
            raise BadInput(f"features of shape {features.shape}: the run {self.run.directory} takes (n, {dim}) "
                           "backbone features")
        if len(image_ids) != len(features):
            raise BadInput(f"{len(image_ids)} ids for {len(features)} feature rows: pass one id per row")
        with self._lock:
            if self.database is not None:
                frame = fused_predictions(self.run, self.database, list(image_ids), features, min(k, CANDIDATES))
            else:
                frame = predictions(self.run, list(image_ids), features, k, self.scoring, scores)
        return abstain(frame, min_confidence)

    def locate_features(self, features: np.ndarray, *, ids: list[str] | None = None, k: int | None = None,
                        min_confidence: float | None = None, as_frame: bool = False) -> list[Answer] | pl.DataFrame:
        """Answers for backbone features (n, dim) (a store's cached rows): one per row, or the table. A row
        holding NaN or infinity gets an Answer whose `error` says so (and no row in the table)."""
        features = np.asarray(features, dtype=np.float32)
        if features.ndim == 1:
            features = features[None]
        ids = [f"#{i}" for i in range(len(features))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(features):
            raise BadInput(f"{len(ids)} ids for {len(features)} feature rows: pass one id per row")
        finite = np.isfinite(features).all(axis=1) if features.ndim == 2 else np.ones(len(features), bool)
        kept = np.flatnonzero(finite)
        frame = self.table(features[kept], [ids[i] for i in kept], k=k, min_confidence=min_confidence)
        if as_frame:
            return frame
        found = iter(answers(frame))
        return [next(found) if ok else Answer(ids[i], error="the descriptor holds values that are not finite (NaN or "
                                              "infinity)", run_status=self.status) for i, ok in enumerate(finite)]

    def locate(self, images: ImageInput | list[ImageInput], *, ids: list[str] | None = None, k: int | None = None,
               min_confidence: float | None = None, as_frame: bool = False) -> list[Answer] | pl.DataFrame:
        """Answers for images (paths, bytes of image files, PIL images, uint8 arrays), one per image in
        order; an image that cannot be used gets an Answer whose `error` says why. `as_frame`: the
        predictions() table of the usable ones instead (one row per image and rank)."""
        self.check_min_confidence(min_confidence)
        self.check_k(k)
        if not isinstance(images, (list, tuple)):
            images = [images]
        ids = [_image_id(im, i) for i, im in enumerate(images)] if ids is None else [str(i) for i in ids]
        if len(ids) != len(images):
            raise BadInput(f"{len(ids)} ids for {len(images)} images: pass one id per image")
        decoded, kept, failed = [], [], {}
        for i, image in enumerate(images):
            try:
                decoded.append(self.decode(image))
                kept.append(i)
            except ImageProblem as e:
                failed[i] = str(e)
        feats = np.concatenate([self.embed(decoded[s:s + self.batch_size])
                                for s in range(0, len(decoded), self.batch_size)]) if decoded else \
            np.zeros((0, self.backbone.dim), np.float32)
        frame = self.table(feats, [ids[i] for i in kept], k=k, min_confidence=min_confidence)
        if as_frame:
            return frame
        found = iter(answers(frame))
        return [Answer(ids[i], error=failed[i], run_status=self.status) if i in failed else next(found)
                for i in range(len(images))]
