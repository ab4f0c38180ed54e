"""The DINOv2 evaluation transform and every kind of awkward image file."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dcfeat.images import IMAGENET_MEAN, ImageProblem, load_image, normalize
from tests.conftest import HOSTILE_KINDS, hostile_image_bytes


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def _noise(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


def test_transform_is_resize_shortest_edge_then_centre_crop(tmp_path):
    img = _noise(512, 384)
    path = _save(img, tmp_path / "a.png")
    # torchvision Resize(256) on 512x384 → 341x256, CenterCrop(224) → left round(58.5)=58... top 16
    ref = img.resize((341, 256), Image.Resampling.BICUBIC)
    left, top = int(round((341 - 224) / 2.0)), int(round((256 - 224) / 2.0))
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)))
    got = load_image(path, 224)
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    assert np.array_equal(got, ref)


def test_other_sizes_keep_the_256_over_224_ratio(tmp_path):
    path = _save(_noise(600, 600), tmp_path / "a.png")
    assert load_image(path, 448).shape == (448, 448, 3)


def test_normalize_uses_imagenet_statistics():
    x = torch.full((1, 4, 4, 3), 255, dtype=torch.uint8)
    out = normalize(x, torch.float32)
    assert out.shape == (1, 3, 4, 4)
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-6)


def test_draft_decoding_stays_close_to_full_decoding(tmp_path):
    # A smooth photo-like image: draft (DCT scaling) vs full decode + bicubic.
    yy, xx = np.mgrid[0:1024, 0:1024]
    arr = np.stack([128 + 100 * np.sin(xx / 40.0), 128 + 100 * np.cos(yy / 55.0), (xx + yy) % 256], -1)
    path = _save(Image.fromarray(arr.astype(np.uint8)), tmp_path / "a.jpg", quality=95)
    full = load_image(path, 224, draft=False).astype(float)
    draft = load_image(path, 224, draft=True).astype(float)
    assert not np.array_equal(full, draft)  # draft really took another path
    assert np.abs(full - draft).mean() < 1.0  # measured 0.29 grey levels (max 7)


@pytest.mark.parametrize("content,reason", [
    (b"", "UnidentifiedImageError"),
    (b"this is a text file, not an image\n" * 10, "UnidentifiedImageError"),
])
def test_non_images_are_problems(tmp_path, content, reason):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageProblem, match=reason):
        load_image(path, 224)


def test_truncated_jpeg_is_a_problem(tmp_path):
    buf = io.BytesIO()
    _noise(300, 300).save(buf, format="JPEG")
    path = tmp_path / "t.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageProblem, match="unreadable"):
        load_image(path, 224)


def test_decompression_bomb_is_a_problem_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)  # 100 Mpx > PIL's 89.5 Mpx limit, a few KB on disk
    with pytest.raises(ImageProblem, match="decompression bomb"):
        load_image(path, 224)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = _save(_noise(256, 256, mode="L"), tmp_path / "g.png")
    out = load_image(path, 224)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg_becomes_the_right_rgb(tmp_path):
    path = _save(Image.new("RGB", (256, 256), (200, 40, 30)).convert("CMYK"), tmp_path / "c.jpg", quality=100)
    out = load_image(path, 224).reshape(-1, 3).mean(0)
    assert np.abs(out - [200, 40, 30]).max() < 6


def test_16_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    arr = np.full((256, 256), 32896, dtype=np.uint16)  # 32896 / 65535 * 255 = 128
    path = _save(Image.fromarray(arr), tmp_path / "w.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path, 224)
    assert np.all(out == 128)


def test_transparent_pixels_become_the_neutral_mean_colour(tmp_path):
    rgba = np.zeros((256, 256, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red hidden under alpha 0
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png")
    out = load_image(path, 224)
    assert np.all(out == [round(255 * c) for c in IMAGENET_MEAN])


def test_exif_rotation_is_applied(tmp_path):
    img = _noise(320, 256)
    upright = _save(img.transpose(Image.Transpose.ROTATE_270), tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = _save(img, tmp_path / "rot.png", exif=exif.tobytes())
    assert np.array_equal(load_image(rotated, 224), load_image(upright, 224))


# D18 of the second adversarial pass: an image that a resize keeping its aspect ratio would make enormous


@pytest.mark.parametrize("crop, why", [("full", "aspect ratio"), ("centre", "too elongated")])
def test_an_extremely_elongated_image_is_a_problem_before_decoding(tmp_path, crop, why):
    import time

    path = _save(Image.new("RGB", (100_000, 1), (90, 90, 90)), tmp_path / "strip.png")
    t = time.perf_counter()
    with pytest.raises(ImageProblem, match=why):
        load_image(path, 224, crop=crop, patch_size=14)
    assert time.perf_counter() - t < 2


def test_whole_images_up_to_eight_to_one_are_kept(tmp_path):
    path = _save(_noise(896, 112), tmp_path / "wide.png")
    assert load_image(path, 56, crop="full", patch_size=14).shape == (56, 448, 3)
    with pytest.raises(ImageProblem, match="8:1"):
        load_image(_save(_noise(910, 112), tmp_path / "wider.png"), 56, crop="full", patch_size=14)


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_other_formats_named_jpg_are_problems_and_never_reach_their_decoder(tmp_path, monkeypatch, kind):
    """H1: a fuzzed DDS raised NotImplementedError, a SPIDER file AttributeError out of load_image (a
    traceback in extract and predict), and an EPS file reached PIL's Ghostscript."""
    from PIL import EpsImagePlugin

    ghostscript = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ghostscript.append(a) or pytest.fail("gs"))
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes(hostile_image_bytes(kind))
    with pytest.raises(ImageProblem, match="JPEG, PNG, WebP, TIFF or BMP"):
        load_image(path, 56)
    assert ghostscript == []


def test_any_decoder_exception_is_the_files_problem_with_its_reason(tmp_path, monkeypatch):
    from PIL import ImageFile

    def broken(self):
        raise NotImplementedError("a decoder's own bug")

    path = _save(_noise(64, 64), tmp_path / "a.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", broken)
    with pytest.raises(ImageProblem, match="undecodable: NotImplementedError: a decoder's own bug"):
        load_image(path, 56)


def test_a_16_bit_png_over_the_byte_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    """H1: the limit counted pixels only, so a 16-bit 88 Mpx PNG passed and took 2.3 GB to decode. At a
    budget of 10,000 8-bit RGB pixels, 10,000 RGB pixels decode and 10,000 16-bit ones are refused."""
    from PIL import ImageFile

    wide = _save(Image.fromarray(np.full((100, 100), 40000, np.uint16)), tmp_path / "wide.png")
    rgb = _save(_noise(100, 100), tmp_path / "rgb.png")
    assert load_image(rgb, 56, max_pixels=100 * 100).shape == (56, 56, 3)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or pytest.fail("decoded"))
    with pytest.raises(ImageProblem, match=r"100x100 pixels of mode I;16 would take 140,000 bytes > 130,000"):
        load_image(wide, 56, max_pixels=100 * 100)
    with pytest.raises(ImageProblem, match="decoding memory budget"):
        load_image(rgb, 56, max_bytes=100 * 100 * 12)
    assert decoded == []
    from dcfeat.images import DECODE_BYTES_OTHER, MAX_PIXELS, decode_bytes

    assert decode_bytes("I;16", 9380, 9380) > MAX_PIXELS * DECODE_BYTES_OTHER  # 88 Mpx at 16 bits: over the default


def test_decode_cost_reads_the_header_as_load_image_decodes_it():
    """Serve's budget and load_image's agree: a big JPEG counts at its draft size, other formats not at all."""
    import io

    from PIL import Image

    from dcfeat.images import decode_bytes, decode_cost

    buf = io.BytesIO()
    Image.new("RGB", (2000, 1000)).save(buf, "JPEG")
    cost, what = decode_cost(buf.getvalue(), 224)  # shortest edge 1000 → 256: drafted by 1/2 to 1000×500
    assert (cost, what) == (decode_bytes("RGB", 1000, 500), "1000x500 RGB JPEG")
    buf = io.BytesIO()
    Image.new("RGBA", (300, 200)).save(buf, "PNG")
    assert decode_cost(buf.getvalue(), 224) == (decode_bytes("RGBA", 300, 200), "300x200 RGBA PNG")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "GIF")  # not a format dcfeat reads
    assert decode_cost(buf.getvalue(), 224) == (0, "unreadable")
