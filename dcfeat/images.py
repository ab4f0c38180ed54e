"""Decoding and DINOv2's evaluation transform, written with PIL (no torchvision).

The transform is torchvision's `Resize(round(S·256/224), BICUBIC)` →
`CenterCrop(S)` → `ToTensor` → `Normalize(ImageNet)`; on PIL images torchvision
resizes with PIL itself, so this reproduces it exactly. Workers return uint8
crops: normalisation happens on the model's device, which moves 4× fewer bytes
to the GPU.

Every decoding problem becomes an `ImageProblem` with a reason string; the
caller records it and goes on. No image ever becomes a zero-filled row.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL's own bomb threshold (~89.5 Mpx); decoding one costs ~270 MB per image and worker.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
_MEAN_RGB = tuple(round(255 * c) for c in IMAGENET_MEAN)


class ImageProblem(Exception):
    """An image that cannot be used; str(self) is the reason recorded in the store."""


def resize_size(image_size: int) -> int:
    """Shortest edge before the centre crop: 256 for the standard 224 crop."""
    return round(image_size * 256 / 224)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips 16-bit values at 255: rescale the real range instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
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


def load_image(path: Path, image_size: int, *, draft: bool = True,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode, orient, convert and crop one image to uint8 (S, S, 3); ImageProblem if unusable."""
    target = resize_size(image_size)
    try:
        with warnings.catch_warnings():
            # The pixel limit is checked below, on the header, before anything is decoded.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageProblem(f"decompression bomb: {w}x{h} pixels > {max_pixels}")
                if draft and img.format == "JPEG":
                    # libjpeg's DCT scaling (1/2, 1/4, 1/8) decodes straight to a smaller size
                    # that still keeps the shortest edge >= target; bicubic does the rest.
                    # BENCHMARKS.md: 3.5-4.5x faster on 512² JPEGs, crops within ~1 grey level.
                    scale = min(w, h) / target
                    if scale >= 2:
                        img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
    except ImageProblem:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageProblem(f"{type(e).__name__}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageProblem(f"unreadable: {type(e).__name__}: {e}") from None
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
    """(B, S, S, 3) uint8 → (B, 3, S, S) ImageNet-normalised `dtype`, on the batch's device."""
    x = batch_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).to(dtype)


class ImageDataset(torch.utils.data.Dataset):
    """Item i → (i, uint8 crop or None, reason); decoding runs in DataLoader workers."""

    def __init__(self, paths: list[Path], image_size: int, *, draft: bool = True,
                 max_pixels: int = MAX_PIXELS):
        self.paths = paths
        self.image_size = image_size
        self.draft = draft
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, torch.from_numpy(load_image(self.paths[i], self.image_size, draft=self.draft,
                                                  max_pixels=self.max_pixels)), ""
        except ImageProblem as e:
            return i, None, str(e)


def collate(items):
    """Keep failures out of the tensor: (indices, uint8 batch or None, failures[(i, reason)])."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, r) for i, x, r in items if x is None]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], batch, failed
