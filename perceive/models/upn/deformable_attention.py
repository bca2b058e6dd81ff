"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

Each query samples ``n_points`` locations per head on every feature level around its reference point (or
inside its reference box) and mixes them with softmax weights. The released detectors run this through a
compiled CUDA kernel; here the sampling is ``grid_sample`` (bilinear, zero padding, ``align_corners=False``),
the formulation their own code keeps as its reference, so nothing needs compiling and it runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_levels(
    value: torch.Tensor, shapes: list[tuple[int, int]], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``value`` ``[B, S, heads, d]`` (the levels' maps flattened in order), ``locations``
    ``[B, Q, heads, levels, points, 2]`` (x, y in [0, 1] of each level), ``weights`` ``[B, Q, heads, levels,
    points]`` -> ``[B, Q, heads * d]``: the weighted sum of the bilinear samples."""
    b, _, heads, d = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1  # grid_sample reads [-1, 1]
    sampled = []
    for level, part in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[level]
        maps = part.flatten(2).transpose(1, 2).reshape(b * heads, d, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [B*heads, Q, points, 2]
        sampled.append(F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [B*heads, d, Q, levels*points]
    mix = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    return (stacked * mix).sum(-1).view(b, heads * d, q).transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``levels`` feature maps; parameter names as the released checkpoints save
    them (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``)."""

    def __init__(self, d_model: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by {heads} heads")
        self.levels, self.heads, self.points = levels, heads, points
        self.sampling_offsets = nn.Linear(d_model, heads * levels * points * 2)
        self.attention_weights = nn.Linear(d_model, heads * levels * points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        memory: torch.Tensor,
        shapes: list[tuple[int, int]],
        padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``query`` ``[B, Q, C]``; ``reference`` ``[B, Q, levels, 2]`` points or ``[B, Q, levels, 4]`` boxes
        (cx, cy, w, h), normalised; ``memory`` ``[B, S, C]``; ``padding`` ``[B, S]``, True where padded."""
        b, q, _ = query.shape
        value = self.value_proj(memory)
        if padding is not None:
            value = value.masked_fill(padding[..., None], 0.0)
        value = value.view(b, memory.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(b, q, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(b, q, self.heads, self.levels, self.points)
        if reference.shape[-1] == 2:
            # offsets are in cells of each level: divided by its (width, height)
            size = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
            locations = reference[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        elif reference.shape[-1] == 4:
            # inside a box: offsets in half its size, spread over the points
            locations = (reference[:, :, None, :, None, :2]
                         + offsets / self.points * reference[:, :, None, :, None, 2:] * 0.5)  # fmt: skip
        else:
            raise ValueError(f"reference points end in 2 (points) or 4 (boxes), got {reference.shape[-1]}")
        return self.output_proj(sample_levels(value, shapes, locations, weights))
