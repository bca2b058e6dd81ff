"""Images into the models' square frames, and boxes back out: shared by every model's processor.

An image of any aspect ratio is padded at the right and bottom to a square (boxes keep their shape
and a box's pixels are its normalised coordinates times ``max(H, W)``), resized to each encoder's
resolution and normalised with ImageNet's mean and standard deviation. The square is never built: the
image is resized first and padded after, so a 1 x 40,000 image costs what its pixels and the
encoder's input do, not 40,000^2.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
BILINEAR = Image.Resampling.BILINEAR


@dataclass
class ImageFrame:
    """How an input image maps onto the model's square frame."""

    width: int
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    def normalize(self, boxes: np.ndarray) -> np.ndarray:
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / self.side

    def to_pixels(self, boxes: np.ndarray | torch.Tensor) -> np.ndarray:
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * self.side
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, self.width)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, self.height)
        return b


def normalize_image(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` floats in [0, 1] to ImageNet-normalised pixel values."""
    mean = torch.tensor(IMAGE_MEAN, dtype=images.dtype, device=images.device)[None, :, None, None]
    std = torch.tensor(IMAGE_STD, dtype=images.dtype, device=images.device)[None, :, None, None]
    return (images - mean) / std


# Strips of the image's rows are resampled at most this many pixels at a time (12 MB of RGB), so padding a
# thin image's short side never allocates its square.
STRIP_PIXELS = 1 << 22


def _checked(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be [H, W, 3] uint8 RGB arrays, got {image.shape} {image.dtype}")
    return image


def _exact_in_float32(numerator: int, denominator: int) -> bool:
    value = numerator / denominator
    return Fraction(float(np.float32(value))) == Fraction(numerator, denominator)


def _extent(length: int, side: int, size: int) -> tuple[int, float, int]:
    """For one axis ``length`` pixels long of an image padded to ``side`` and resized to ``size``: how many output
    pixels can differ from the padding's zeros (``count``), the source span they cover (``span``, ``count * side /
    size``) and how far into the padded axis bilinear resampling reads for them (``reach``)."""
    if length == side:
        return size, float(side), side
    scale = side / size
    support = max(scale, 1.0)  # PIL widens bilinear's support by the scale when it shrinks
    needed = min(size, math.ceil((length + support + 1) / scale) + 1)
    # PIL takes the box as float32: a span that float32 holds exactly gives the very weights of the padded square's
    # resize. A few more output pixels (zeros, or the image's faded edge, as in the square) usually find one; past a
    # quarter more, the work is not worth it and the span is off by float32's rounding (measured: at most 1 of
    # 255 levels).
    candidates = range(needed, min(size, needed + needed // 4 + 2) + 1)
    count = next((n for n in candidates if _exact_in_float32(n * side, size)), needed)
    span = count * side / size
    return count, span, min(side, math.ceil(span + support) + 2)


def _fitted(image: np.ndarray, size: int) -> np.ndarray:
    """``[size, size, 3]`` uint8: ``image`` padded at the right and bottom to its square, then resized to ``size``
    (bilinear), computed by resizing first and padding after, so memory is bounded by the image and ``size``, not by
    the square of its longer side."""
    h, w = _checked(image).shape[:2]
    side = max(h, w)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    if side == size:
        out[:h, :w] = image
        return out
    if h == w:
        return np.array(Image.fromarray(image).resize((size, size), BILINEAR))
    cols, span_x, reach_x = _extent(w, side, size)
    rows, span_y, reach_y = _extent(h, side, size)
    # PIL resamples across, then down; doing the same two passes separately, on only as much of the padding as the
    # kept output pixels read, reproduces the square's resize where the image is.
    across = np.empty((h, cols, 3), dtype=np.uint8)
    strip = max(1, STRIP_PIXELS // reach_x)
    for y in range(0, h, strip):
        part = np.zeros((min(strip, h - y), reach_x, 3), dtype=np.uint8)
        part[:, :w] = image[y : y + strip]
        box = (0.0, 0.0, span_x, float(part.shape[0]))
        across[y : y + strip] = np.asarray(Image.fromarray(part).resize((cols, part.shape[0]), BILINEAR, box=box))
    padded = np.zeros((reach_y, cols, 3), dtype=np.uint8)
    padded[:h] = across
    down = Image.fromarray(padded).resize((cols, rows), BILINEAR, box=(0.0, 0.0, float(cols), span_y))
    out[:rows, :cols] = np.asarray(down)
    return out


def _resized(image: np.ndarray, size: int) -> torch.Tensor:
    """``[3, size, size]`` floats in [0, 1]: ``image`` padded to its square and resized."""
    return torch.from_numpy(_fitted(image, size)).permute(2, 0, 1).float() / 255


def square_pixels(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` normalised pixels of ``[H, W, 3]`` uint8 images, each padded to its square."""
    return normalize_image(torch.stack([_resized(im, size) for im in images]))


def dual_resolution_pixels(
    images: Sequence[np.ndarray], low: int, high: int
) -> tuple[dict[str, torch.Tensor], list[ImageFrame]]:
    """The dual vision encoder's inputs: ``pixel_low`` and ``pixel_high`` (normalised) and ``rgb_high``
    (the high-resolution image in [0, 1], which the object encoder can read as one more level), with
    each image's frame."""
    lows: list[torch.Tensor] = []
    highs: list[torch.Tensor] = []
    frames: list[ImageFrame] = []
    for arr in images:
        lows.append(_resized(arr, low))
        highs.append(_resized(arr, high))
        frames.append(ImageFrame(arr.shape[1], arr.shape[0]))
    low_t, high_t = torch.stack(lows), torch.stack(highs)
    return {"pixel_low": normalize_image(low_t), "pixel_high": normalize_image(high_t), "rgb_high": high_t}, frames


@dataclass
class EncodedImage:
    """An image made ready for a decoder model's questions (MVP-LM, REF-VLM): the array, its frame and the model's
    ``encode_image`` output for it alone."""

    array: np.ndarray
    frame: ImageFrame
    image: dict


@torch.no_grad()
def encode_images(images: Sequence, processor, model) -> list[EncodedImage]:
    """``images`` (paths, bytes, PIL images or arrays) through ``processor.images`` and ``model.encode_image`` on the
    model's device, one at a time."""
    from perceive.devices import answering
    from perceive.images import load_image

    out = []
    device = next(model.parameters()).device
    for im in images:
        arr = load_image(im)
        pixels, frames = processor.images([arr])
        with answering(device):
            image = model.encode_image(pixels["pixel_low"].to(device), pixels["pixel_high"].to(device))
        out.append(EncodedImage(arr, frames[0], image))
    return out
