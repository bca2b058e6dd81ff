"""RexSeek's model with the release's module names, so that its safetensors load as they are.

- ``model`` (``Qwen2Model``) and ``lm_head``: the language model, its keys at the top level;
- ``vision_tower.vision_tower`` (``CLIPVisionModel``): image tokens from CLIP's ``mm_vision_select_layer``
  (-2, the penultimate), patches only;
- ``vision_tower_aux`` (``convnext.ConvNextEncoder``): the four ConvNeXt stages of the 768-pixel image; the last
  stage's cells join CLIP's patches channel-wise (CLIP first) through ``mm_projector`` (Linear, GELU, Linear);
- one object token per box: the four stages upsampled to the first's stride (4) and concatenated, RoI Align
  7 x 7 (``aligned=False``, adaptive sampling) averaged, plus a sine embedding of the box (centre y, centre x,
  width, height over the 768 frame, each ``channels / 4`` wide, temperature 10000, scale 2 pi), through
  ``mm_object_projector``.

The towers' sizes are read from the weights (``tower_shapes``): RexSeek fixes them in code, not in its config.
"""

from __future__ import annotations

import functools
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Model

from perceive.boxes import roi_align
from perceive.models.generation import CACHE_ARGUMENT, output_cache
from perceive.models.position_codes import interleaved_sine
from perceive.models.rexseek.configuration_rexseek import RexSeekConfig
from perceive.models.rexseek.convnext import ConvNextEncoder

IMAGE_PLACEHOLDER = -200  # the release's IMAGE_TOKEN_INDEX: where the image tokens go
OBJECT_PLACEHOLDER = -300  # its DEFAULT_OBJECT_INDEX: where each box's object token goes
ROI_SIZE = 7
CLIP_KEY = "vision_tower.vision_tower.vision_model."
CONVNEXT_KEY = "vision_tower_aux."


def sine_box_embedding(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """``[N, 4 * dim]`` for ``[N, 4]`` xyxy boxes in [0, 1]: sin/cos of centre y, centre x, width, height."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    return torch.cat([interleaved_sine(c * (2 * math.pi), dim) for c in (cy, cx, w, h)], dim=1)


def projector(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class CLIPTower(nn.Module):
    def __init__(self, config: CLIPVisionConfig, select_layer: int, select_feature: str) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)
        self.select_layer, self.select_feature = select_layer, select_feature

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixels, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden[:, 1:] if self.select_feature == "patch" else hidden


def tower_shapes(shapes: dict[str, tuple[int, ...]]) -> tuple[CLIPVisionConfig, tuple[int, ...], tuple[int, ...]]:
    """The CLIP configuration and the ConvNeXt dims and depths that weights of these shapes were saved from
    (CLIP's heads: its width / 64, as every OpenAI CLIP has them)."""
    patch = shapes[CLIP_KEY + "embeddings.patch_embedding.weight"]
    positions = shapes[CLIP_KEY + "embeddings.position_embedding.weight"][0]
    layers = {int(m[1]) for k in shapes if (m := re.match(re.escape(CLIP_KEY) + r"encoder\.layers\.(\d+)\.", k))}
    side = math.isqrt(positions - 1)
    if side * side != positions - 1 or not layers:
        raise ValueError(f"the CLIP tower's weights ({positions} positions, {len(layers)} layers) are not a ViT's")
    width = patch[0]
    inner = shapes[CLIP_KEY + "encoder.layers.0.mlp.fc1.weight"][0]
    clip = CLIPVisionConfig(hidden_size=width, intermediate_size=inner, num_hidden_layers=max(layers) + 1,
                            num_attention_heads=max(1, width // 64), image_size=side * patch[2], patch_size=patch[2],
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
    stages = sorted({int(m[1]) for k in shapes if (m := re.match(r"vision_tower_aux\.vision_stages\.(\d+)\.", k))})
    dims, depths = [], []
    for s in stages:
        blocks = {int(m[1]) for k in shapes
                  if (m := re.match(rf"vision_tower_aux\.vision_stages\.{s}\.blocks\.(\d+)\.", k))}  # fmt: skip
        dims.append(shapes[f"vision_tower_aux.vision_stages.{s}.blocks.0.ramma"][0])
        depths.append(max(blocks) + 1)
    if len(dims) != 4:
        raise ValueError(f"the ConvNeXt tower has {len(dims)} stages; RexSeek's has 4")
    return clip, tuple(dims), tuple(depths)


def module_name(release_name: str) -> str:
    """This code's name of a released weight: the release (transformers 4) keeps CLIP's weights under
    ``vision_model.``, which transformers 5's ``CLIPVisionModel`` no longer has."""
    if release_name.startswith(CLIP_KEY) and not _clip_nests_vision_model():
        return "vision_tower.vision_tower." + release_name[len(CLIP_KEY) :]
    return release_name


@functools.cache
def _clip_nests_vision_model() -> bool:
    with torch.device("meta"):
        probe = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=1, image_size=14, patch_size=14))  # fmt: skip
    return any(k.startswith("vision_model.") for k in probe.state_dict())


class RexSeekForCausalLM(nn.Module):
    def __init__(self, config: RexSeekConfig, clip: CLIPVisionConfig, dims: tuple[int, ...], depths: tuple[int, ...]):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision_tower = CLIPTower(clip, config.mm_vision_select_layer, config.mm_vision_select_feature)
        self.vision_tower_aux = ConvNextEncoder(dims, depths)
        self.mm_projector = projector(clip.hidden_size + dims[-1], config.hidden_size)
        self.mm_object_projector = projector(sum(dims), config.hidden_size)
        self.clip_size = int(clip.image_size)  # type: ignore[arg-type]
        # ConvNeXt's last stage (stride 32) has a cell for each CLIP patch: 24 x 24 for 336 / 14, so 768 pixels
        self.aux_size = 32 * (self.clip_size // int(clip.patch_size))  # type: ignore[arg-type]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def encode(self, pixels_aux: torch.Tensor, pixels_clip: torch.Tensor, boxes: list[torch.Tensor]):
        """Each image's tokens ``[n, hidden]`` and its boxes' object tokens ``[N_i, hidden]`` (boxes: xyxy in the
        ``aux_size`` frame)."""
        low = self.vision_tower(pixels_clip)
        levels = self.vision_tower_aux(pixels_aux)
        high = levels[-1].flatten(2).transpose(1, 2)
        images = self.mm_projector(torch.cat([low, high], dim=-1))
        objects = [self.encode_boxes([level[i : i + 1] for level in levels], b, images.dtype)
                   for i, b in enumerate(boxes)]  # fmt: skip
        return list(images), objects

    def encode_boxes(self, levels: list[torch.Tensor], boxes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        size = levels[0].shape[-2:]
        upsampled = [F.interpolate(level.float(), size=size, mode="bilinear", align_corners=False)
                     for level in levels[1:]]  # fmt: skip
        fmap = torch.cat([levels[0].float(), *upsampled], dim=1)
        boxes = boxes.float()
        pooled = roi_align(fmap, [boxes], ROI_SIZE, size[-1] / self.aux_size, sampling_ratio=-1, aligned=False)
        position = sine_box_embedding(boxes / self.aux_size, fmap.shape[1] // 4)
        return self.mm_object_projector((pooled.mean(dim=(2, 3)) + position).to(dtype))

    def embed(self, ids: list[int], image: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """``[L, hidden]``: the text's embeddings with the image tokens at the image placeholder and the k-th
        object token at the k-th object placeholder."""
        parts: list[torch.Tensor] = []
        text: list[int] = []
        k = 0
        table = self.model.embed_tokens

        def flush() -> None:
            if text:
                parts.append(table(torch.tensor(text, device=table.weight.device)))
                text.clear()

        for t in ids:
            if t == IMAGE_PLACEHOLDER:
                flush()
                parts.append(image)
            elif t == OBJECT_PLACEHOLDER:
                flush()
                parts.append(objects[k : k + 1])
                k += 1
            else:
                text.append(t)
        flush()
        return torch.cat(parts).to(table.weight.dtype)

    def forward(self, inputs_embeds: torch.Tensor, past_key_values: object | None = None):
        """(logits of the last position ``[B, vocab]``, the cache)."""
        out = self.model(inputs_embeds=inputs_embeds, use_cache=True, **{CACHE_ARGUMENT: past_key_values})
        return self.lm_head(out.last_hidden_state[:, -1]), output_cache(out)
