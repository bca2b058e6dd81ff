"""Loading images the way users hand them over, into ``[H, W, 3]`` uint8 RGB arrays.

Handled: paths, bytes, PIL images and arrays; EXIF orientation (the picture is turned as a viewer
shows it, so boxes match what people see); grayscale and palette images (to RGB); transparency
(composited on white, not turned black); 16-bit and float images (rescaled to 8 bits). Refused with
``ImageError``, before anything is decoded: missing or empty files, files over ``MAX_FILE_BYTES``,
anything that is not one of ``FORMATS`` (an EPS would be handed to Ghostscript), images over
``MAX_PIXELS`` (decompression bombs) or with a side over ``MAX_SIDE``; and truncated files.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # a 6300 x 6300 image; larger ones are refused before decoding
MAX_SIDE = 65_535  # JPEG's own limit; bounds a thin image (1 x 40,000,000 is under MAX_PIXELS) before decoding
MAX_FILE_BYTES = 200_000_000  # checked before a file is read
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # PIL's names; no other decoder is ever run


class ImageError(ValueError):
    pass


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def load_image(source: str | Path | bytes | Image.Image | np.ndarray) -> np.ndarray:
    """An RGB uint8 array from a path, encoded bytes, a PIL image or an array; ``ImageError`` if unusable."""
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or min(arr.shape[:2]) == 0:
            raise ImageError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}")
        _check_size(arr.shape[1], arr.shape[0], "the image array")
        if arr.dtype != np.uint8:  # 16-bit or float arrays: stretch to 8 bits, drop alpha
            return np.asarray(_scale_to_uint8(arr))
        return np.ascontiguousarray(arr[..., :3]) if arr.shape[2] == 3 else np.asarray(_to_rgb(Image.fromarray(arr)))
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, "the image")
        return _rgb_array(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"no such image file: {path}")
        _check_bytes(path.stat().st_size, str(path))
        try:
            fp = path.open("rb")
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror}") from None
        with fp:  # PIL reads the header, then only what decoding needs: the file is never read whole
            return _rgb_array(_decoded(fp, str(path)))
    data = bytes(source)
    _check_bytes(len(data), "the upload")
    return _rgb_array(_decoded(io.BytesIO(data), "the upload"))


def _check_bytes(size: int, name: str) -> None:
    if size == 0:
        raise ImageError(f"{name} is empty")
    if size > MAX_FILE_BYTES:
        raise ImageError(f"{name} is {size:,} bytes: over the {MAX_FILE_BYTES // 1_000_000} MB limit for an image")


def _check_size(width: int, height: int, name: str) -> None:
    if width == 0 or height == 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    if max(width, height) > MAX_SIDE:
        raise ImageError(f"{name} is {width}x{height}: a side over the {MAX_SIDE:,}-pixel limit")
    if width * height > MAX_PIXELS:
        raise ImageError(f"{name} is {width}x{height}: over the {MAX_PIXELS:,}-pixel limit")


def _decoded(fp: BinaryIO, name: str) -> Image.Image:
    """The image in ``fp``, decoded only once its header shows an accepted format and size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=FORMATS)
            _check_size(im.width, im.height, name)
            im.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        bomb = f"{name} is too large to decode safely (a decompression bomb; the limit is {MAX_PIXELS:,} pixels)"
        raise ImageError(bomb) from None
    except UnidentifiedImageError:
        raise ImageError(_not_accepted(fp, name)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name} is corrupt or truncated: {e}") from None
    return im


def _not_accepted(fp: BinaryIO, name: str) -> str:
    """Why PIL found no accepted image in ``fp``, naming the format its first bytes show where they show one."""
    fp.seek(0)
    found = _sniffed_format(fp.read(16))
    accepted = ", ".join(FORMATS)
    if found in FORMATS:
        return f"{name} is corrupt: it starts as a {found} file but its header is unreadable"
    if found:
        return f"{name} is not in an accepted format: it looks like {found} (accepted formats: {accepted})"
    return f"{name} is not an image (accepted formats: {accepted})"


def _sniffed_format(head: bytes) -> str | None:
    """The format whose magic number ``head`` starts with, by PIL's plugins' own tests (which parse no header)."""
    if head.startswith(b"%PDF"):  # PIL writes PDFs but has no reader to recognise one
        return "PDF"
    Image.init()
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(head):
                return fmt
        except (IndexError, SyntaxError, TypeError, ValueError, struct.error):
            continue
    return None


def _rgb_array(im: Image.Image) -> np.ndarray:
    im = ImageOps.exif_transpose(im) or im
    return np.asarray(_to_rgb(im)).copy()


def _scale_to_uint8(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr, dtype=np.float64)[..., :3]
    lo, hi = float(a.min()), float(a.max())
    return Image.fromarray(((a - lo) * (255.0 / (hi - lo) if hi > lo else 0)).astype(np.uint8))
