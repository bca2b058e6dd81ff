"""The dense parts the query decoders share (MVP-LM's, REF-VLM's): DETR's 2D sine positions, a small MLP, an FPN
pixel decoder giving per-pixel embeddings at stride 4 and the coarser levels as the queries' memory, and the text
tokens a decoder reads, left-aligned."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def left_aligned(states: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``states`` ``[B, L, H]`` at the positions ``keep`` ``[B, L]`` marks, moved to the front of each row: ``[B, N,
    H]`` with its padding mask ``[B, N]`` (N the most kept in a row; a row that keeps nothing leaves its first slot
    unmasked, so that attention always has a key)."""
    counts = keep.sum(1)
    width = max(1, int(counts.max())) if len(counts) else 1
    out = states.new_zeros((states.shape[0], width, states.shape[-1]))
    padding = torch.ones((states.shape[0], width), dtype=torch.bool, device=states.device)
    for b in range(states.shape[0]):
        n = int(counts[b])
        out[b, :n] = states[b, keep[b]]
        padding[b, :n] = False
    padding[padding.all(-1), 0] = False
    return out, padding


def sine_positions(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """``[h * w, dim]`` 2D sine position embedding (DETR's), row-major."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py = ys[:, None] * freq[None]
    px = xs[:, None] * freq[None]
    emb_y = torch.cat([py.sin(), py.cos()], -1)[:, None].expand(h, w, 2 * quarter)
    emb_x = torch.cat([px.sin(), px.cos()], -1)[None].expand(h, w, 2 * quarter)
    out = torch.cat([emb_y, emb_x], -1).reshape(h * w, 4 * quarter)
    return F.pad(out, (0, dim - out.shape[-1]))


class MLP(nn.Module):
    """Linear layers (under ``layers.N``) with ``activation`` between them."""

    def __init__(self, dims: list[int], activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class PixelDecoder(nn.Module):
    """An FPN over the ConvNeXt levels (strides 4, 8, 16, ...): per-pixel embeddings at stride 4 and the coarser
    levels as the decoder's memory, coarsest first."""

    def __init__(self, in_channels: list[int], dim: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in in_channels)
        # depthwise-separable 3 x 3 convolutions: a full one at stride 4 was most of a CPU training step
        self.output = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1, groups=dim), nn.Conv2d(dim, dim, 1), nn.GroupNorm(8, dim),
                          nn.GELU())
            for _ in in_channels
        )  # fmt: skip
        self.mask_features = nn.Conv2d(dim, dim, 1)

    def forward(self, levels: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x: torch.Tensor | None = None
        outs = []
        for lateral, output, level in zip(reversed(self.lateral), reversed(self.output), reversed(levels), strict=True):
            y = lateral(level)
            if x is not None:
                y = y + F.interpolate(x, size=y.shape[-2:], mode="nearest")
            x = output(y)
            outs.append(x)
        # outs: coarsest first; the finest (stride 4) gives the per-pixel embeddings
        return self.mask_features(outs[-1]), outs[:-1]
