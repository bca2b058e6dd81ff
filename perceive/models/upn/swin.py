"""A Swin Transformer backbone (Liu et al. 2021) in plain PyTorch, with the parameter names of the detection
Swin that the released UPN (and Grounding DINO, T-Rex2) save: ``patch_embed``, ``layers.N.blocks.M``,
``layers.N.downsample``, ``normN``.

Pre-norm blocks attend inside windows, every second block over windows shifted by half a window (the wrapped
around regions kept apart by a -100 bias); the map is padded at the bottom and right to whole windows, and a
patch merging at the end of each stage but the last halves the resolution and doubles the channels. Each stage's
output passes its own LayerNorm (``normN``): maps of strides 4, 8, 16 and 32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SHIFT_MASK_BIAS = -100.0  # what the released code adds between wrapped-around regions


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of ``window``) -> ``[B * windows, window * window, C]``, row by row."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of ``window_partition``: ``[B * windows, window * window, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """``[window², window²]``: for each pair of cells in a window, the row of their offset in the bias table
    (offsets of -(window-1)..window-1 per axis, rows first)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """``[windows, window², window²]``: 0 between cells of the same region of the shifted map, -100 between
    regions that only the cyclic shift made neighbours."""
    regions = torch.zeros(1, h, w, 1)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols, :] = label
            label += 1
    cells = window_partition(regions, window).squeeze(-1)
    differ = cells[:, None, :] != cells[:, :, None]
    return torch.zeros(differ.shape).masked_fill(differ, SHIFT_MASK_BIAS)


class WindowAttention(nn.Module):
    relative_position_index: torch.Tensor

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        # computed, not loaded: the released files also hold it, and the loader checks theirs equals this one
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n_windows, cells, c = x.shape
        q, k, v = self.qkv(x).view(n_windows, cells, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        attn = attn + bias.view(cells, cells, -1).permute(2, 0, 1)[None]
        if mask is not None:
            per_image = mask.shape[0]
            attn = (attn.view(-1, per_image, self.heads, cells, cells) + mask[None, :, None]).view_as(attn)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(n_windows, cells, c))


class SwinMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwinMlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, shift_mask: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        win = self.window
        y = self.norm1(x).view(b, h, w, c)
        y = F.pad(y, (0, 0, 0, (win - w % win) % win, 0, (win - h % win) % win))
        hp, wp = y.shape[1:3]
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_merge(self.attn(window_partition(y, win), shift_mask if self.shift else None), win, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y[:, :h, :w].reshape(b, h * w, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
        # the released order of the 2x2 neighbours: (0,0), (1,0), (0,1), (1,1) as (row, column)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float, merge: bool) -> None:
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio) for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if merge else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage's output ``[B, h*w, C]`` and, with a merging, the next stage's input."""
        win = self.window
        mask = shifted_window_mask(math.ceil(h / win) * win, math.ceil(w / win) * win, win, win // 2)
        mask = mask.to(device=x.device, dtype=x.dtype)
        for block in self.blocks:
            x = block(x, h, w, mask)
        return x, (self.downsample(x, h, w) if self.downsample is not None else None)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h, w = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, (-w) % self.patch, 0, (-h) % self.patch))
        return self.proj(pixels)


class SwinBackbone(nn.Module):
    def __init__(self, embed_dim: int, depths: list[int], heads: list[int], window: int, patch: int = 4,
                 mlp_ratio: float = 4.0) -> None:  # fmt: skip
        super().__init__()
        if len(depths) != len(heads):
            raise ValueError(f"{len(depths)} stage depths but {len(heads)} head counts")
        self.channels = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(c, d, n, window, mlp_ratio, merge=i < len(depths) - 1)
            for i, (c, d, n) in enumerate(zip(self.channels, depths, heads, strict=True))
        )
        for i, c in enumerate(self.channels):
            self.add_module(f"norm{i}", nn.LayerNorm(c))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """``[B, 3, H, W]`` -> one ``[B, C_i, H_i, W_i]`` map per stage, each through its ``norm{i}``."""
        x = self.patch_embed(pixels)
        h, w = x.shape[-2:]
        x = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        maps = []
        for i, stage in enumerate(self.layers):
            out, x = stage(x, h, w)
            out = getattr(self, f"norm{i}")(out)
            maps.append(out.view(-1, h, w, self.channels[i]).permute(0, 3, 1, 2).contiguous())
            h, w = (h + 1) // 2, (w + 1) // 2
        return maps
