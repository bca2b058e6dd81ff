"""Pathological images (issue 41): thin images in bounded memory, absurd headers, formats outside the
allow-list and huge files are refused before anything is decoded or read whole."""

import io
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

from perceive import images
from perceive.images import FORMATS, ImageError, load_image
from perceive.models.image_processing import dual_resolution_pixels, square_pixels


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels (its data is a token few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _pad_then_resize(image: np.ndarray, size: int) -> np.ndarray:
    """The frame as it was built before issue 41: the whole square, then resized."""
    side = max(image.shape[:2])
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[: image.shape[0], : image.shape[1]] = image
    im = Image.fromarray(square)
    return np.array(im if side == size else im.resize((size, size), Image.Resampling.BILINEAR))


def _levels(pixels: torch.Tensor) -> np.ndarray:
    """[3, size, size] floats in [0, 1] back to [size, size, 3] levels of 255."""
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


THIN_IMAGES_PEAK = textwrap.dedent("""
    import io, resource, sys
    import numpy as np
    from PIL import Image
    from perceive.images import load_image
    from perceive.models.image_processing import dual_resolution_pixels, square_pixels

    pngs = []
    for size in [(1, 40_000), (40_000, 1)]:
        buf = io.BytesIO()
        Image.new("RGB", size, (255, 255, 255)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # a regression must fail here, not take the machine: 2 GB more address space than now, at most
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 1024**3, resource.getrlimit(resource.RLIMIT_AS)[1]))
    for png in pngs:
        image = load_image(png)
        pixels, frames = dual_resolution_pixels([image], 128, 256)
        upn = square_pixels([image], 256)
        assert frames[0].side == 40_000 and upn.shape == (1, 3, 256, 256)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")


def test_thin_images_take_megabytes_not_their_square():
    # A 1 x 40000 PNG of 157 bytes took 11.2 GB when it was padded to 40000^2 before resizing.
    r = subprocess.run([sys.executable, "-c", THIN_IMAGES_PEAK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 300, f"peak memory grew by {r.stdout.strip()} MB"


@pytest.mark.parametrize("shape", [(1, 40_000), (40_000, 1), (3, 5_000), (5_000, 3)])
def test_a_thin_image_lies_along_the_top_or_left_edge_of_its_frame(shape):
    image = np.full((*shape, 3), 255, dtype=np.uint8)
    pixels, frames = dual_resolution_pixels([image], 128, 256)
    assert (frames[0].width, frames[0].height, frames[0].side) == (shape[1], shape[0], max(shape))
    rgb = _levels(pixels["rgb_high"][0]).sum(axis=2)
    along = rgb if shape[1] > shape[0] else rgb.T
    assert along[0].min() > 0  # the first row (or column) holds it end to end, however faint
    assert along[2:].max() == 0  # and the padding below (or right) of it stays black
    if min(shape) == 3:
        assert along[0].min() > 10


@pytest.mark.parametrize(
    "shape", [(20, 40), (40, 20), (1, 300), (1, 3000), (3000, 1), (48, 64), (64, 48), (3, 1000), (77, 50)]
)
@pytest.mark.parametrize("size", [8, 256, 336])
def test_resizing_first_gives_the_padded_squares_pixels(shape, size):
    image = np.random.default_rng(sum(shape) + size).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = _pad_then_resize(image, size).astype(np.int16)
    upn = square_pixels([image], size)[0]
    pixels, _ = dual_resolution_pixels([image], size, size)
    assert torch.equal(upn, pixels["pixel_high"][0])
    difference = np.abs(_levels(pixels["rgb_high"][0]) - reference).max()
    assert difference <= 1  # off only by the rounding of PIL's float32 box where no exact one is near
    if size & (size - 1) == 0:  # a power of two: the box is always exact
        assert difference == 0


@pytest.mark.parametrize("side", [5, 40, 256, 300])
def test_square_images_are_bitwise_as_before(side):
    image = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels, _ = dual_resolution_pixels([image], 128, 256)
    for key, size in [("rgb_high", 256), ("pixel_low", 128)]:
        got = pixels[key][0] if key == "rgb_high" else square_pixels([image], size)[0]
        expected = torch.from_numpy(_pad_then_resize(image, size)).permute(2, 0, 1).float() / 255
        if key == "pixel_low":
            mean = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
            expected = (expected - mean) / torch.tensor((0.229, 0.224, 0.225))[:, None, None]
        assert torch.equal(got, expected)


@pytest.mark.parametrize("width, height", [(39_999_999, 1), (1, 39_999_999), (70_000, 2)])
def test_an_absurd_side_is_refused_from_the_header(tmp_path, width, height):
    data = _png_header(width, height)
    path = tmp_path / "thin.png"
    path.write_bytes(data)
    for source in (data, path):
        start = time.perf_counter()
        with pytest.raises(ImageError, match=f"{width}x{height}: a side over the 65,535-pixel limit"):
            load_image(source)
        assert time.perf_counter() - start < 0.5


def test_a_header_past_pils_bomb_limit_is_refused_with_ours():
    with pytest.raises(ImageError, match="decompression bomb; the limit is 40,000,000 pixels"):
        load_image(_png_header(20_000, 20_000))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\n"


def _saved(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data, name", [(EPS, "EPS"), (_saved("PDF"), "PDF"), (_saved("ICO"), "ICO"),
                                        (_saved("PPM"), "PPM")])  # fmt: skip
def test_formats_outside_the_allow_list_are_refused_undecoded(tmp_path, monkeypatch, data, name):
    def never(*_: object, **__: object) -> None:
        raise AssertionError("an EPS reached Ghostscript")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", never)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", never)
    path = tmp_path / "picture.png"  # the name does not matter: the bytes do
    path.write_bytes(data)
    with pytest.raises(ImageError, match=rf"picture\.png is not in an accepted format: it looks like {name} "):
        load_image(path)
    with pytest.raises(ImageError, match="accepted formats: PNG, JPEG, WEBP, BMP, GIF, TIFF"):
        load_image(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_accepted_format_loads(fmt):
    image = load_image(_saved(fmt))
    assert image.shape == (8, 16, 3) and abs(int(image[4, 8, 1]) - 200) < 8


def test_a_huge_file_is_refused_without_being_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(3 * 1024**3)  # sparse: no disk is used
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge\.png is 3,221,225,472 bytes: over the 200 MB limit"):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 2_000_000)
    with pytest.raises(ImageError, match="the upload is 2,000,001 bytes: over the 2 MB limit"):
        load_image(bytes(2_000_001))
