"""The dual vision encoder (ChatRex Sec. 3.2): a CLIP ViT at low resolution for the image tokens and a
ConvNeXt at high resolution for a feature pyramid that objects are pooled from.

The ConvNeXt's last map is pooled to the ViT's patch grid and concatenated to the ViT tokens along
channels (the paper's "same number of tokens at the last scale"); a model's own projector maps the
result into its language model's width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel


class DualVisionEncoder(nn.Module):
    def __init__(self, vit: CLIPVisionConfig, convnext: ConvNextConfig) -> None:
        super().__init__()
        self.vit = CLIPVisionModel(vit)
        self.convnext = ConvNextModel(convnext)
        self.grid = int(vit.image_size) // int(vit.patch_size)  # type: ignore[arg-type]

    @property
    def token_channels(self) -> int:
        """Channels of each image token: the ViT's width plus the ConvNeXt's last level."""
        return int(self.vit.config.hidden_size) + self.pyramid_channels[-1]

    @property
    def pyramid_channels(self) -> list[int]:
        return [int(c) for c in self.convnext.config.hidden_sizes or []]

    def forward(self, pixel_low: torch.Tensor, pixel_high: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image tokens ``[B, G*G, token_channels]`` (row-major over the ViT's G x G grid) and the ConvNeXt
        pyramid (strides 4, 8, 16, ...)."""
        vit = self.vit(pixel_values=pixel_low).last_hidden_state[:, 1:]  # drop CLS
        levels = list(self.convnext(pixel_high, output_hidden_states=True).hidden_states[1:])
        pooled = F.adaptive_avg_pool2d(levels[-1], self.grid).flatten(2).transpose(1, 2)
        return torch.cat([vit, pooled], dim=-1), levels
