"""RexSeek's ConvNeXt tower (``vision_tower_aux``), with the released weights' names.

timm's ConvNeXt (stem: 4x4 convolution and LayerNorm; four stages of blocks: depthwise 7x7 convolution,
LayerNorm over channels, Linear 4x, exact GELU, Linear, a per-channel layer scale, a residual) keeping only the
stem and the stages, as RexSeek does. The layer scale is named ``ramma`` in the release (RexSeek renamed timm's
``gamma``, which ``transformers`` would otherwise rewrite to ``weight`` on load).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``[N, C, H, W]`` map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ConvNextBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.ramma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        y = self.mlp(y).permute(0, 3, 1, 2)
        return x + y * self.ramma.reshape(1, -1, 1, 1)


class ConvNextStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, first: bool) -> None:
        super().__init__()
        # the first stage keeps the stem's resolution and width: no downsampling (and no weights for it)
        self.downsample = nn.Identity() if first else nn.Sequential(LayerNorm2d(in_dim, eps=1e-6),
                                                                    nn.Conv2d(in_dim, dim, 2, stride=2))  # fmt: skip
        self.blocks = nn.Sequential(*(ConvNextBlock(dim) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNextEncoder(nn.Module):
    """The four stages' feature maps (strides 4, 8, 16, 32) of an image; ConvNeXt-L: dims (192, 384, 768, 1536),
    depths (3, 3, 27, 3)."""

    def __init__(self, dims: tuple[int, ...] = (192, 384, 768, 1536), depths: tuple[int, ...] = (3, 3, 27, 3)) -> None:
        super().__init__()
        self.dims, self.depths = tuple(dims), tuple(depths)
        self.vision_stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        stages = [ConvNextStage(dims[max(k - 1, 0)], dims[k], depths[k], first=k == 0) for k in range(len(dims))]
        self.vision_stages = nn.Sequential(*stages)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        x = self.vision_stem(pixels)
        levels = []
        for stage in self.vision_stages:
            x = stage(x)
            levels.append(x)
        return levels
