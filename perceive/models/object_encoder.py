"""The object encoder (ChatRex Sec. 3.2): one feature vector per box, from the vision pyramid.

Multi-scale RoI Align over the pyramid (plus, optionally, the RGB image as one more level) gives each
box an ``output_size`` x ``output_size`` grid; the grid is averaged (``pooling="mean"``, ChatRex) or kept
whole in order (``"flatten"``, so the object's layout survives), projected, and a sine-cosine
embedding of the box (cx, cy, w, h) is added. A model's own projector maps the result into its
language model's width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from perceive.boxes import multi_level_roi_align, roi_align

POOLINGS = ("mean", "flatten")


def box_position_embedding(boxes: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine-cosine embedding of normalised xyxy boxes through (cx, cy, w, h): ``[..., 4] -> [..., dim]``."""
    if dim % 8:
        raise ValueError(f"position_dim must be a multiple of 8, got {dim}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    coords = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)  # [..., 4]
    n_freq = dim // 8
    freqs = temperature ** (torch.arange(n_freq, dtype=boxes.dtype, device=boxes.device) / n_freq)
    angles = coords[..., None] * 2 * math.pi / freqs  # [..., 4, F]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def box_coordinates(boxes: torch.Tensor) -> torch.Tensor:
    """Normalised xyxy boxes as (cx, cy, w, h) scaled to about [-1, 1]: ``[..., 4] -> [..., 4]``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0 + x1 - 1, y0 + y1 - 1, 2 * (x1 - x0), 2 * (y1 - y0)], dim=-1)


class ObjectEncoder(nn.Module):
    def __init__(
        self,
        pyramid_channels: list[int],
        object_dim: int,
        position_dim: int,
        output_size: int = 4,
        rgb_level: bool = True,
        pooling: str = "mean",
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"roi_pooling must be one of {POOLINGS}, got {pooling!r}")
        self.output_size, self.rgb_level, self.pooling, self.position_dim = (
            output_size,
            rgb_level,
            pooling,
            position_dim,
        )
        self.grid_channels = (sum(pyramid_channels) + (3 if rgb_level else 0)) * (
            output_size**2 if pooling == "flatten" else 1
        )
        self.roi_proj = nn.Linear(self.grid_channels, object_dim)
        self.position_proj = nn.Linear(position_dim, object_dim)

    def forward(
        self, levels: list[torch.Tensor], rgb: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From the pyramid ``levels``, the image ``rgb`` ``[B, 3, S, S]`` at the pyramid's input size and
        normalised xyxy ``boxes`` ``[B, K, 4]`` (padding where ``box_mask`` is False): the object features
        ``[B, K, object_dim]`` (zero at padding) and each box's pooled RoI grid ``[B, K, grid_channels]``
        (what a probe of the box's whole surroundings reads)."""
        b, k, _ = boxes.shape
        size = rgb.shape[-1]
        flat = boxes.reshape(-1, 4) * size
        rois = torch.cat([torch.arange(b, device=boxes.device).repeat_interleave(k)[:, None].to(flat), flat], dim=1)
        strides = [size // lv.shape[-1] for lv in levels]
        s = self.output_size
        grid = multi_level_roi_align(levels, rois, s, strides, sampling_ratio=2, aligned=True, reduce="concat")
        if self.rgb_level:
            grid = torch.cat([grid, roi_align(rgb, rois, s, 1.0, sampling_ratio=2, aligned=True)], dim=1)
        pooled = grid.flatten(1) if self.pooling == "flatten" else grid.mean(dim=(2, 3))
        obj = self.roi_proj(pooled) + self.position_proj(
            box_position_embedding(boxes.reshape(-1, 4), self.position_dim)
        )
        return obj.reshape(b, k, -1) * box_mask[..., None], pooled.reshape(b, k, -1)
