"""Images into the models' square frames, and boxes back out: shared by every model's processor.

An image of any aspect ratio is padded at the right and bottom to a square (boxes keep their shape
and a box's pixels are its normalised coordinates times ``max(H, W)``), resized to each encoder's
resolution and normalised with ImageNet's mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


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


def _square(image: np.ndarray) -> Image.Image:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"images must be [H, W, 3] uint8 RGB arrays, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    square = np.zeros((max(h, w), max(h, w), 3), dtype=np.uint8)
    square[:h, :w] = image
    return Image.fromarray(square)


def _resized(square: Image.Image, size: int) -> torch.Tensor:
    """``[3, size, size]`` floats in [0, 1]."""
    im = square if square.size[0] == size else square.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def square_pixels(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` normalised pixels of ``[H, W, 3]`` uint8 images, each padded to its square."""
    return normalize_image(torch.stack([_resized(_square(im), size) for im in images]))


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
        square = _square(arr)
        lows.append(_resized(square, low))
        highs.append(_resized(square, high))
        frames.append(ImageFrame(arr.shape[1], arr.shape[0]))
    low_t, high_t = torch.stack(lows), torch.stack(highs)
    return {"pixel_low": normalize_image(low_t), "pixel_high": normalize_image(high_t), "rgb_high": high_t}, frames
