"""Loading images the way users hand them over, into ``[H, W, 3]`` uint8 RGB arrays.

Handled: paths, bytes, PIL images and arrays; EXIF orientation (the picture is turned as a viewer
shows it, so boxes match what people see); grayscale and palette images (to RGB); transparency
(composited on white, not turned black); 16-bit and float images (rescaled to 8 bits). Refused with
``ImageError``: missing or empty files, anything that is not an image, truncated files, and images
over ``MAX_PIXELS`` (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # a 6300 x 6300 image; larger ones are refused before decoding


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
        if arr.dtype != np.uint8:  # 16-bit or float arrays: stretch to 8 bits, drop alpha
            return np.asarray(_scale_to_uint8(arr))
        return np.ascontiguousarray(arr[..., :3]) if arr.shape[2] == 3 else np.asarray(_to_rgb(Image.fromarray(arr)))
    if isinstance(source, Image.Image):
        im = source
    else:
        if isinstance(source, (str, Path)):
            p = Path(source)
            if not p.is_file():
                raise ImageError(f"no such image file: {p}")
            data = p.read_bytes()
            name = str(p)
        else:
            data, name = bytes(source), "the upload"
        if not data:
            raise ImageError(f"{name} is empty")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{name} is {im.width}x{im.height}: over the {MAX_PIXELS:,}-pixel limit")
                im.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name} is too large to decode safely (decompression bomb)") from None
        except UnidentifiedImageError:
            raise ImageError(f"{name} is not an image PIL can read") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name} is corrupt or truncated: {e}") from None
    if im.width * im.height > MAX_PIXELS:
        raise ImageError(f"image is {im.width}x{im.height}: over the {MAX_PIXELS:,}-pixel limit")
    if im.width == 0 or im.height == 0:
        raise ImageError("image has no pixels")
    im = ImageOps.exif_transpose(im) or im
    return np.asarray(_to_rgb(im)).copy()


def _scale_to_uint8(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr, dtype=np.float64)[..., :3]
    lo, hi = float(a.min()), float(a.max())
    return Image.fromarray(((a - lo) * (255.0 / (hi - lo) if hi > lo else 0)).astype(np.uint8))
