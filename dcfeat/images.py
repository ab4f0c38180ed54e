"""Decoding and the two crops, written with PIL (no torchvision).

`centre` is DINOv2's evaluation transform, torchvision's `Resize(round(S·256/224),
BICUBIC)` → `CenterCrop(S)` → `ToTensor` → `Normalize(ImageNet)`; on PIL images
torchvision resizes with PIL itself, so this reproduces it exactly. `full` keeps
the whole image as D&C's test set does (`Resize(S)`: the shorter side becomes S,
the aspect ratio is kept), with the longer side rounded to a multiple of the
patch size so every pixel falls in a patch; the backbone interpolates its
position embeddings (DINOv2) or computes RoPE for the grid (DINOv3). Workers
return uint8 images: normalisation happens on the model's device, which moves
4× fewer bytes to the GPU. Images of several shapes travel as `Crops`, one
tensor per shape.

Every decoding problem becomes an `ImageProblem` with a reason string; the
caller records it and goes on. No image ever becomes a zero-filled row.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's own bomb threshold (~89.5 Mpx); decoding one 8-bit RGB image that large holds ~1.2 GB per worker
# (DECODE_BYTES below), which is the decoding memory budget of every mode.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# --crop full keeps the aspect ratio, so its cost grows with it (patches linearly, attention with their
# square). 8:1 holds every camera format (4:3, 3:2, 16:9, 21:9), equirectangular panoramas (2:1) and most
# stitched cylindrical ones, at most 8× the patches and 64× the attention of a square image; wider strips
# are refused (the image skipped with its reason), never embedded for hours.
MAX_ASPECT = 8
_MEAN_RGB = tuple(round(255 * c) for c in IMAGENET_MEAN)
# The formats dcfeat reads (docs: JPEG, PNG, WebP, TIFF, BMP; MPO, a camera's JPEG, opens as JPEG). PIL
# would try some forty others, each a decoder fed whatever a user or a client sends: EPS runs Ghostscript,
# a fuzzed DDS or SPIDER file raises NotImplementedError or AttributeError. Those are never opened.
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF", "BMP")
FORMAT_NAMES = "JPEG, PNG, WebP, TIFF or BMP"
# Bytes per pixel that decoding holds at its peak, by the mode the header announces: the decoded image
# (PIL keeps a one-band 8-bit mode in 1 byte, 16-bit ones in 2, "I" and "F" in 4, every multi-band mode
# in 4), its conversion (16-bit and float modes through numpy, alpha composited) and the RGB image. Peak
# RSS of load_image on 16 Mpx images, rounded up: L 6.2, P 10.2, RGB and CMYK 12.1, 16-bit 13.2 (28.1
# before its conversion went through integers), RGBA and LA 24.2, I and F 32.2.
DECODE_BYTES = {"1": 7, "L": 7, "P": 11, "I;16": 14, "I;16L": 14, "I;16B": 14, "I;16N": 14, "I": 33, "F": 33,
                "RGBA": 25, "LA": 25, "PA": 25, "RGBa": 25, "La": 25}
DECODE_BYTES_OTHER = 13  # RGB, CMYK, YCbCr, …: 4-byte pixels


class ImageProblem(Exception):
    """An image that cannot be used; str(self) is the reason recorded in the store."""


def resize_size(image_size: int) -> int:
    """Shortest edge before the centre crop: 256 for the standard 224 crop."""
    return round(image_size * 256 / 224)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Bytes that decoding a `width`×`height` image of `mode` holds at its peak (DECODE_BYTES)."""
    return width * height * DECODE_BYTES.get(mode, DECODE_BYTES_OTHER)


def _draft(img: Image.Image, target: int) -> None:
    """A JPEG decodes at libjpeg's DCT scaling (1/2, 1/4, 1/8): straight to a smaller size that still keeps
    the shortest edge >= target; bicubic does the rest. BENCHMARKS.md: 3.5-4.5x faster on 512² JPEGs, crops
    within ~1 grey level."""
    if img.format == "JPEG":
        scale = min(img.size) / target
        if scale >= 2:
            img.draft("RGB", (math.ceil(img.width / scale), math.ceil(img.height / scale)))


def decode_cost(image: bytes | Image.Image, image_size: int, crop: str = "centre") -> tuple[int, str]:
    """(the bytes decoding `image` holds at its peak, `decode_bytes`; what it is, e.g. "9400x9400 RGBA PNG"),
    from its header alone, a JPEG at the size `load_image`'s draft decodes it to. (0, "unreadable") for bytes
    of no format dcfeat reads: decoding them says why."""
    if isinstance(image, Image.Image):
        return decode_bytes(image.mode, *image.size), f"{image.width}x{image.height} {image.mode} pixels"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(image), formats=FORMATS)
        _draft(img, image_size if crop == "full" else resize_size(image_size))
    except Exception:  # noqa: BLE001  whatever the header's parser raises: decoding gives the reason
        return 0, "unreadable"
    return decode_bytes(img.mode, *img.size), f"{img.width}x{img.height} {img.mode} {img.format}"


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode.startswith("I;16"):
        # PIL's convert("RGB") clips 16-bit values at 255: rescale the real range instead, in integers
        # (round half up, as the float formula below gives), 4 bytes a pixel instead of float64's 24.
        wide = np.asarray(img).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        return Image.fromarray(wide.astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        if img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        arr8 = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels often hide garbage colours: composite onto the ImageNet
        # mean colour, which the normalisation maps to zero (a neutral input).
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, _MEAN_RGB + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return img.convert("RGB")


def whole_size(width: int, height: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """(width, height) of a whole image resized for --crop full: the shorter side becomes `image_size` (a
    multiple of the patch size), the longer one keeps the aspect ratio, rounded to the nearest patch multiple."""
    short, long = sorted((width, height))
    side = max(patch_size, round(image_size * long / short / patch_size) * patch_size)
    return (image_size, side) if width <= height else (side, image_size)


def check_shape(width: int, height: int, image_size: int, *, crop: str = "centre", patch_size: int = 1,
                max_pixels: int = MAX_PIXELS) -> None:
    """ImageProblem, from the header alone, for an image whose resized form would be unusable.

    `full`: at most MAX_ASPECT:1. The resize keeps the aspect ratio, so a 1×100,000 strip would become
    28×2,800,000 pixels, 200,000 patches, and attention costs the square of that: hours for one image.
    Both crops: the resized image (before the centre crop) holds at most `max_pixels`, the decompression
    bomb limit, as the decoded one does.
    """
    short, long = sorted((max(width, 1), max(height, 1)))
    if crop == "full":
        if long > MAX_ASPECT * short:
            w, h = whole_size(width, height, image_size, patch_size)
            raise ImageProblem(f"--crop full: {width}x{height} pixels is wider than the {MAX_ASPECT:g}:1 aspect ratio "
                               f"limit; whole it would be {w}x{h} pixels, {(w // patch_size) * (h // patch_size):,} "
                               "patches. Cut it into pieces, or extract with --crop centre")
        return
    target = resize_size(image_size)
    resized = target * int(target * long / short)
    if resized > max_pixels:
        raise ImageProblem(f"{width}x{height} pixels is too elongated: resized to {target} on the short side it "
                           f"would hold {resized:,} pixels > {max_pixels:,} (the decompression bomb limit)")


def load_image(path: Path, image_size: int, *, crop: str = "centre", patch_size: int = 1, draft: bool = True,
               max_pixels: int = MAX_PIXELS, max_bytes: int | None = None) -> np.ndarray:
    """Decode, orient, convert and crop one image to uint8 (H, W, 3); ImageProblem if unusable.

    `crop` is one of CROPS: "centre" gives (S, S, 3); "full" the whole image (whole_size, rounded to
    multiples of `patch_size`). Only FORMATS are opened, whatever the file's name. Refused from the
    header, before anything is decoded: more than `max_pixels` pixels, or more than `max_bytes` of
    memory to decode (`decode_bytes`: mode and bit depth count; default what `max_pixels` 8-bit RGB
    pixels take, ~1.2 GB). Whatever else a decoder raises is the file's problem too, with its reason.
    """
    target = image_size if crop == "full" else resize_size(image_size)
    budget = max_pixels * DECODE_BYTES_OTHER if max_bytes is None else max_bytes
    try:
        with warnings.catch_warnings():
            # The pixel limit is checked below, on the header, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageProblem(f"decompression bomb: {w}x{h} pixels > {max_pixels}")
                check_shape(w, h, image_size, crop=crop, patch_size=patch_size, max_pixels=max_pixels)
                if draft:
                    _draft(img, target)
                need = decode_bytes(img.mode, *img.size)  # what draft() left to decode
                if need > budget:
                    raise ImageProblem(f"too large to decode: {img.size[0]}x{img.size[1]} pixels of mode {img.mode} "
                                       f"would take {need:,} bytes > {budget:,} (the decoding memory budget)")
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
    except ImageProblem:
        raise
    except UnidentifiedImageError as e:
        raise ImageProblem(f"{type(e).__name__}: {e} (not a {FORMAT_NAMES} image, the formats dcfeat reads)") from None
    except Image.DecompressionBombError as e:
        raise ImageProblem(f"{type(e).__name__}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageProblem(f"unreadable: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 — a decoder's own bug on a hostile file (NotImplementedError, …)
        raise ImageProblem(f"undecodable: {type(e).__name__}: {e}") from None
    if crop == "full":
        size = whole_size(*img.size, image_size, patch_size)
        return np.array(img if size == img.size else img.resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)
    return center_crop(resize_shortest(img, target), image_size)


def resize_shortest(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    # torchvision's rule: the short edge becomes `size`, the long one int(size·long/short).
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    if new == (w, h):
        return img
    return img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    if w < size or h < size:
        raise ImageProblem(f"too small after resize: {w}x{h} < {size}")
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def normalize(batch_uint8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) ImageNet-normalised `dtype`, on the batch's device."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype)


class ImageDataset(torch.utils.data.Dataset):
    """Item i → (i, uint8 image or None, reason); decoding runs in DataLoader workers."""

    def __init__(self, paths: list[Path], image_size: int, *, crop: str = "centre", patch_size: int = 1,
                 draft: bool = True, max_pixels: int = MAX_PIXELS, max_bytes: int | None = None):
        self.paths = paths
        self.options = {"crop": crop, "patch_size": patch_size, "draft": draft, "max_pixels": max_pixels,
                        "max_bytes": max_bytes}
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, torch.from_numpy(load_image(self.paths[i], self.image_size, **self.options)), ""
        except ImageProblem as e:
            return i, None, str(e)


@dataclass
class Crops:
    """A batch of decoded images stacked per shape (images of other shapes cannot share a tensor).

    `groups`: (positions in the batch, uint8 (b, H, W, 3)) in order of first appearance; square
    crops make one group.
    """

    groups: list[tuple[list[int], torch.Tensor]]

    @classmethod
    def stack(cls, images: list[torch.Tensor]) -> Crops:
        by_shape: dict[tuple, list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(position)
        return cls([(positions, torch.stack([images[p] for p in positions])) for positions in by_shape.values()])

    def __len__(self) -> int:
        return sum(len(positions) for positions, _ in self.groups)

    def pin_memory(self) -> Crops:  # what DataLoader(pin_memory=True) calls on a custom batch type
        return Crops([(positions, x.pin_memory()) for positions, x in self.groups])

    def map(self, forward):
        """`forward` once per shape (a tensor, or a tuple of them, per row), rows back in batch order."""
        outs = [forward(x) for _, x in self.groups]
        if len(outs) == 1:
            return outs[0]
        order = torch.tensor([p for positions, _ in self.groups for p in positions])
        inverse = torch.argsort(order)

        def in_order(parts):
            joined = torch.cat(parts)
            return joined[inverse.to(joined.device)]

        if isinstance(outs[0], tuple):
            return tuple(in_order(list(parts)) for parts in zip(*outs))
        return in_order(outs)


def collate(items):
    """Keep failures out of the tensors: (indices, Crops or None, failures[(i, reason)])."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, r) for i, x, r in items if x is None]
    crops = Crops.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], crops, failed


def decoding_workers(workers: int | None, images: int | None = None, batch_size: int = 1) -> int:
    """DataLoader processes that decode images: `workers`, or by default one per core (at most 16) and no
    more than the batches beyond the first: a handful of photos decodes in the main process, where
    starting processes would cost more than decoding them."""
    if workers is not None:
        return workers
    cores = min(16, os.cpu_count() or 1)
    return cores if images is None else min(cores, max(0, -(-images // batch_size) - 1))
