"""Photos of the street city (dcfeat.synthetic.streets) as an SF-XL-named image set: train, test-db, test, val.

"train" is a drive every `spacing_m` metres at fixed headings relative to the
street, "test-db" a second drive every `database_spacing_m` metres, both in
daylight with small variation. Queries ("test", "val") stand at random points
and random compass headings, off the centre line, at dusk, blurred, behind
cars and pedestrians, with a tilted horizon.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import utm
from PIL import Image, ImageFilter

from dcfeat.synthetic.streets import (
    DUSK,
    ORIGIN,
    ROAD_M,
    City,
    make_streets,
    palette_view,
    saturated,
)

SPLITS = ("train", "test-db", "test", "val")
CITY_FILE = "city.json"  # written last: a folder holding it is a complete rendering


def _occlude(rng: np.random.Generator, img: np.ndarray) -> None:
    """Paint 1-3 cars (wide, low, with a darker window band) or pedestrians (tall, narrow)."""
    size = img.shape[0]
    for _ in range(rng.integers(1, 4)):
        car = rng.random() < 0.5
        w, h = rng.uniform([0.25, 0.12], [0.45, 0.2]) if car else rng.uniform([0.04, 0.25], [0.07, 0.4])
        w, h = int(w * size), int(h * size)
        x, bottom = rng.integers(-w // 2, size - w // 2), int(rng.uniform(0.6, 1.0) * size)
        x0, y0 = max(x, 0), max(bottom - h, 0)
        img[y0:bottom, x0:x + w] = saturated(rng, 1)[0] * rng.uniform(0.3, 0.9)
        if car:
            img[y0:y0 + h // 3, x0:x + w] *= 0.4


def _photo(table: np.ndarray, pixels: np.ndarray, rng: np.random.Generator, query: bool) -> Image.Image:
    """Daylight with a little exposure and white-balance variation, or a noisy, blurred dusk photo."""
    if not query:
        gain = rng.uniform(0.93, 1.07) * rng.normal(1.0, 0.02, 3)
        return Image.fromarray(np.take(np.clip(table * gain * 255 + 0.5, 0, 255).astype(np.uint8), pixels, axis=0))
    img = np.take(table, pixels, axis=0)
    _occlude(rng, img)
    img *= (rng.uniform(0.45, 0.7) * DUSK * 255).astype(np.float32)
    img += rng.normal(0, 4.0, img.shape).astype(np.float32)  # sensor noise of a dark exposure
    photo = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    return photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.6, 1.6) * img.shape[0] / 224))


def sfxl_name(east: float, north: float, pano: str, heading: int) -> str:
    """`@UTM_east@UTM_north@10@S@lat@lon@pano_id@@heading@@@@@@.jpg`, the SF-XL file name of a photo."""
    lat, lon = utm.to_latlon(east, north, 10, "S")
    return f"@{east:010.2f}@{north:010.2f}@10@S@{lat:.5f}@{lon:.5f}@{pano}@@{heading}@@@@@@.jpg"


def _drive(city: City, step: float) -> list[tuple[int, float]]:
    """(street, along) every `step` metres along every street; a crossing is kept once, on its first street."""
    spots = []
    for index, street in enumerate(city.streets):
        for along in np.arange(0.0, street.length + 1e-6, step):
            on_crossing = abs(along / city.block_m - round(along / city.block_m)) < 1e-9
            if index < len(city.streets) // 2 or not on_crossing:
                spots.append((index, float(along)))
    return spots


def render_city(out_dir: Path, *, seed: int = 0, streets: int = 4, block_m: float = 60.0, spacing_m: float = 4.0,
                headings: tuple[int, ...] = (0, 90, 180, 270), size: int = 224, queries: int = 40,
                val_queries: int = 10, database_spacing_m: float = 8.0, quality: int = 90,
                rotation_deg: float = 17.0) -> dict[str, list[Path]]:
    """Write train/, test-db/, test/ and val/ JPEGs and city.json under out_dir; return each split's paths.

    Train and database headings are relative to the street (0: looking along
    it, 90: at its right facades); the file names carry compass headings.
    """
    if not 16 <= size <= 512:
        raise ValueError(f"size={size}: choose an image size from 16 to 512 pixels")
    out_dir = Path(out_dir)
    if any(out_dir.glob("*/*.jpg")):
        raise FileExistsError(f"{out_dir} already holds images; pass an empty or new folder")
    # Rendered beside out_dir and moved into it when complete: an interrupted rendering never looks
    # like a city, and the next one starts afresh.
    work = rendering_dir(out_dir)
    if work.exists():
        shutil.rmtree(work)
    city = make_streets(seed=seed, streets=streets, block_m=block_m, rotation_deg=rotation_deg)
    rng = np.random.default_rng([seed, 99])  # conditions and queries; buildings have their own seeds
    paths: dict[str, list[Path]] = {}

    def save(split: str, pano: str, index: int, along: float, across: float, heading: int, horizon_px: float) -> None:
        view = palette_view(city, index, along, across, heading, size, horizon_px)
        photo = _photo(*view, rng, query=split in ("test", "val"))
        east, north = city.streets[index].utm_of(along, across)
        name = sfxl_name(float(east), float(north), pano, heading)
        photo.save(work / split / name, quality=quality)
        paths.setdefault(split, []).append(out_dir / split / name)

    for split, step in (("train", spacing_m), ("test-db", database_spacing_m)):
        (work / split).mkdir(parents=True, exist_ok=True)
        for k, (index, along) in enumerate(_drive(city, step)):
            for rel in headings:
                save(split, f"p{k:06d}", index, along, 0.0, int(round(city.streets[index].bearing + rel)) % 360, 0.0)
    for split, count in (("test", queries), ("val", val_queries)):
        (work / split).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            index = int(rng.integers(len(city.streets)))
            # Off the centre line (a pedestrian, another lane), any heading, a tilted horizon.
            along, across = rng.uniform(0, city.streets[index].length), rng.uniform(-0.6, 0.6) * ROAD_M
            save(split, f"p{k:06d}", index, along, across, int(rng.integers(360)), rng.normal(0, size * 0.03))
    settings = dict(seed=seed, streets=streets, block_m=block_m, spacing_m=spacing_m, headings=list(headings),
                    size=size, queries=queries, val_queries=val_queries, database_spacing_m=database_spacing_m,
                    quality=quality, rotation_deg=rotation_deg, origin=list(ORIGIN))
    (work / CITY_FILE).write_text(json.dumps(settings, indent=1))
    _move_into(work, out_dir)
    return {split: paths.get(split, []) for split in SPLITS}


def rendering_dir(out_dir: Path) -> Path:
    """Where render_city works before its city is complete: hidden, beside `out_dir`."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.rendering")


def _move_into(work: Path, out_dir: Path) -> None:
    """The finished rendering becomes `out_dir`: one rename where out_dir is new or empty, else folder by
    folder with CITY_FILE, the mark of a complete city, last."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        work.rename(out_dir)
        return
    for split in SPLITS:
        if (out_dir / split).is_dir():
            (out_dir / split).rmdir()  # empty of photos: checked before rendering
        (work / split).rename(out_dir / split)
    (work / CITY_FILE).rename(out_dir / CITY_FILE)
    work.rmdir()


def is_incomplete_rendering(folder: Path) -> bool:
    """A folder holding split folders of rendered photos and nothing else, without CITY_FILE: what an
    interrupted render_city left when it still rendered in place."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / CITY_FILE).exists():
        return False
    entries = list(folder.iterdir())
    return bool(entries) and all(
        e.is_dir() and e.name in SPLITS and all(f.name.startswith("@") and f.suffix == ".jpg" for f in e.iterdir())
        for e in entries)
