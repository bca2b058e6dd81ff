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
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)


class DualEncoderParts:
    """The parts' configurations of a model built from the dual vision encoder and a Qwen2 (ChatRex's, MVP-LM's,
    REF-VLM's): a configuration with ``vision_config``, ``convnext_config`` and ``text_config`` dicts and
    ``low_resolution``."""

    vision_config: dict
    convnext_config: dict
    text_config: dict
    low_resolution: int

    def vision(self) -> CLIPVisionConfig | SiglipVisionConfig:
        """The ViT's configuration: a CLIP's, or a SigLIP's where ``vision_config`` says ``model_type``
        "siglip_vision_model" (``perceive.models.pretrained_parts``)."""
        fields = {k: v for k, v in self.vision_config.items() if k not in ("model_type", "image_size")}
        siglip = self.vision_config.get("model_type") == "siglip_vision_model"
        return (SiglipVisionConfig if siglip else CLIPVisionConfig)(**fields, image_size=self.low_resolution)

    def convnext(self) -> ConvNextConfig:
        cfg = dict(self.convnext_config)
        cfg.setdefault("num_stages", len(cfg.get("depths", [3, 3, 9, 3])))
        return ConvNextConfig(**cfg)

    def text(self) -> Qwen2Config:
        return Qwen2Config(**self.text_config)

    @property
    def image_grid(self) -> int:
        """Image tokens per side: the ViT's patch grid (the ConvNeXt map is pooled to it)."""
        v = self.vision()
        return int(v.image_size) // int(v.patch_size)  # type: ignore[arg-type]


class DualVisionEncoder(nn.Module):
    def __init__(self, vit: CLIPVisionConfig | SiglipVisionConfig, convnext: ConvNextConfig) -> None:
        super().__init__()
        self.vit = SiglipVisionModel(vit) if isinstance(vit, SiglipVisionConfig) else CLIPVisionModel(vit)
        self.has_cls = not isinstance(vit, SiglipVisionConfig)  # CLIP's first token is its class token
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
        vit = self.vit(pixel_values=pixel_low).last_hidden_state[:, int(self.has_cls) :]
        levels = list(self.convnext(pixel_high, output_hidden_states=True).hidden_states[1:])
        pooled = F.adaptive_avg_pool2d(levels[-1], self.grid).flatten(2).transpose(1, 2)
        return torch.cat([vit, pooled], dim=-1), levels
