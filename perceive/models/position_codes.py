"""Sine codes of coordinates (Transformer, DETR): each coordinate, in radians, divided by ``temperature ** (2 *
(i // 2) / dim)`` for i < dim, its even channels through sin and its odd ones through cos, interleaved."""

from __future__ import annotations

import torch


def interleaved_sine(radians: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """``[...]`` -> ``[..., dim]``."""
    steps = torch.arange(dim, dtype=torch.float32, device=radians.device)
    phase = radians[..., None] / temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / dim)
    return torch.stack((phase[..., 0::2].sin(), phase[..., 1::2].cos()), dim=-1).flatten(-2)
