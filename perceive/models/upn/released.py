"""The released UPN (ChatRex's ``upn_large.pth``, IDEA-Research/ChatRex): a Swin-L and a two-stage
Deformable DETR whose queries are scored against one of two learnt prompts, coarse (objects) or fine (parts).

Read from the public code (``chatrex/upn`` at b98028c) and rebuilt in plain PyTorch: the released code needs a
compiled deformable-attention kernel, this one runs anywhere (``deformable_attention``). The sizes are read from
the weights (Swin width, depths, heads and window; levels, points, layers, queries), so the released file and
smaller ones in its layout load alike; what the weights cannot say (8 attention heads in the transformer, the
sine position codes' temperatures) is the released configuration's.

The forward pass, as the release computes it:
1. Swin maps at strides 4-32, each through its LayerNorm, projected to ``d_model`` (1x1 conv + GroupNorm(32));
   a fifth level by a 3x3 stride-2 conv over the last Swin map. Each level gets a sine position code
   (temperature 20, normalised to 2π) plus its ``level_embed``.
2. Encoder: post-norm layers of deformable self-attention around each cell's centre, then a ReLU FFN.
3. Two-stage queries: every cell proposes a box (its centre, a side of ``0.05 * 2**level``) refined by
   ``enc_out_bbox_embed``; its memory through ``enc_output`` + LayerNorm is scored against the prompt and the
   ``num_queries`` best become the reference boxes. The queries' content is the learnt ``tgt_embed``.
4. Decoder: each layer's query position is ``ref_point_head`` of the reference box's sine code; self-attention,
   deformable cross-attention inside the box, FFN (all post-norm); one box MLP, shared by all layers, refines
   the box. A query's logit is its normed state's dot product with the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from perceive.models.image_processing import BILINEAR, IMAGE_MEAN, IMAGE_STD
from perceive.models.pixel_decoder import MLP
from perceive.models.position_codes import interleaved_sine
from perceive.models.upn.deformable_attention import MultiScaleDeformableAttention
from perceive.models.upn.swin import SwinBackbone

PROMPTS = {"fine": "fine_grained_prompt", "coarse": "coarse_grained_prompt"}


@dataclass(frozen=True)
class ReleasedUpnConfig:
    """The released UPN's sizes; the defaults are ``upn_large``'s (ChatRex's ``configs/upn_large.py``)."""

    swin_embed_dim: int = 192
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_heads: tuple[int, ...] = (6, 12, 24, 48)
    swin_window: int = 12
    swin_patch: int = 4
    swin_mlp_ratio: float = 4.0
    d_model: int = 256
    levels: int = 5
    heads: int = 8  # the transformer's; not readable from the weights' shapes
    points: int = 4
    ffn: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_queries: int = 900
    short_side: int = 800  # images are resized so, the long side at most max_side
    max_side: int = 1333


def box_mlp(dims: list[int]) -> MLP:
    """The released ``MLP``: Linear layers with ReLU between, under ``layers.N``."""
    return MLP(dims, activation=F.relu)


class EncoderLayer(nn.Module):
    def __init__(self, c: ReleasedUpnConfig) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(c.d_model, c.levels, c.heads, c.points)
        self.norm1 = nn.LayerNorm(c.d_model)
        self.linear1 = nn.Linear(c.d_model, c.ffn)
        self.linear2 = nn.Linear(c.ffn, c.d_model)
        self.norm2 = nn.LayerNorm(c.d_model)

    def forward(self, src, pos, reference, shapes, padding):
        src = self.norm1(src + self.self_attn(src + pos, reference, src, shapes, padding))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    def __init__(self, c: ReleasedUpnConfig) -> None:
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(c.d_model, c.levels, c.heads, c.points)
        self.norm1 = nn.LayerNorm(c.d_model)
        self.self_attn = nn.MultiheadAttention(c.d_model, c.heads, batch_first=True)
        self.norm2 = nn.LayerNorm(c.d_model)
        self.linear1 = nn.Linear(c.d_model, c.ffn)
        self.linear2 = nn.Linear(c.ffn, c.d_model)
        self.norm3 = nn.LayerNorm(c.d_model)

    def forward(self, tgt, query_pos, reference, memory, shapes, padding):
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norm1(tgt + self.cross_attn(tgt + query_pos, reference, memory, shapes, padding))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Encoder(nn.Module):
    def __init__(self, c: ReleasedUpnConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))


class Decoder(nn.Module):
    def __init__(self, c: ReleasedUpnConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.ref_point_head = box_mlp([2 * c.d_model, c.d_model, c.d_model])
        # for point references, which the release never makes: it adds this head's output times 0
        self.ref_point_head_point = box_mlp([c.d_model, c.d_model, c.d_model])


class Transformer(nn.Module):
    def __init__(self, c: ReleasedUpnConfig) -> None:
        super().__init__()
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.level_embed = nn.Parameter(torch.zeros(c.levels, c.d_model))
        self.tgt_embed = nn.Embedding(c.num_queries, c.d_model)
        self.enc_output = nn.Linear(c.d_model, c.d_model)
        self.enc_output_norm = nn.LayerNorm(c.d_model)
        self.enc_out_bbox_embed = box_mlp([c.d_model, c.d_model, c.d_model, 4])
        self.fine_grained_prompt = nn.Embedding(1, c.d_model)
        self.coarse_grained_prompt = nn.Embedding(1, c.d_model)


def sine_position_code(padding: torch.Tensor, per_axis: int, temperature: float) -> torch.Tensor:
    """``[B, 2 * per_axis, H, W]`` for a padding mask ``[B, H, W]`` (True where padded): the cumulative position
    of each valid cell, normalised to (0, 2π], as interleaved sines and cosines, y's channels first."""
    valid = (~padding).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    codes = [interleaved_sine(coord, per_axis, temperature) for coord in (y, x)]
    return torch.cat(codes, dim=3).permute(0, 3, 1, 2)


def box_sine_code(boxes: torch.Tensor, per_axis: int) -> torch.Tensor:
    """``[..., 4]`` normalised (cx, cy, w, h) -> ``[..., 4 * per_axis]``: sine codes (temperature 10000) of y,
    x, w, h in that order."""
    return torch.cat([interleaved_sine(boxes[..., k] * (2 * math.pi), per_axis) for k in (1, 0, 2, 3)], dim=-1)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_sizes(padding: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: the unpadded width and height of each map (padding ``[B, H, W]`` is at the bottom and right)."""
    return torch.stack([(~padding[:, 0, :]).sum(1), (~padding[:, :, 0]).sum(1)], -1).float()


def valid_ratios(padding: torch.Tensor) -> torch.Tensor:
    """``[B, 2]``: the unpadded share of the map's width and height."""
    h, w = padding.shape[1:]
    return valid_sizes(padding) / torch.tensor([w, h], dtype=torch.float32, device=padding.device)


def cell_proposals(padding: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per cell of every level (its centre in the unpadded image, sides ``0.05 * 2**level``), as
    logits ``[B, S, 4]``, and which cells may propose ``[B, S]`` (unpadded, the box inside (0.01, 0.99))."""
    per_level = []
    for level, pad in enumerate(padding):
        b, h, w = pad.shape
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=pad.device),
                                torch.arange(w, dtype=torch.float32, device=pad.device), indexing="ij")  # fmt: skip
        centres = (torch.stack([xs, ys], -1)[None] + 0.5) / valid_sizes(pad).view(b, 1, 1, 2)
        sides = torch.full_like(centres, 0.05 * 2.0**level)
        per_level.append(torch.cat([centres, sides], -1).view(b, -1, 4))
    boxes = torch.cat(per_level, 1)
    usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~torch.cat([p.flatten(1) for p in padding], 1)
    return torch.log(boxes / (1 - boxes)), usable


class ReleasedUpn(nn.Module):
    """The released UPN's modules under the names its checkpoint uses, except two: the Swin sits at
    ``backbone`` (``backbone.model.backbone`` in the file) and the decoders' one box MLP at ``bbox_embed`` (the
    file saves it under each of its aliases); ``released_loading`` maps between the two."""

    def __init__(self, config: ReleasedUpnConfig) -> None:
        super().__init__()
        c = self.config = config
        self.backbone = SwinBackbone(
            c.swin_embed_dim, list(c.swin_depths), list(c.swin_heads), c.swin_window, c.swin_patch, c.swin_mlp_ratio
        )
        stages = self.backbone.channels
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(ch, c.d_model, kernel_size=1), nn.GroupNorm(32, c.d_model)) for ch in stages
        )
        extra_in = stages[-1]
        for _ in range(c.levels - len(stages)):
            self.input_proj.append(nn.Sequential(nn.Conv2d(extra_in, c.d_model, kernel_size=3, stride=2, padding=1),
                                                 nn.GroupNorm(32, c.d_model)))  # fmt: skip
            extra_in = c.d_model
        self.transformer = Transformer(c)
        self.bbox_embed = box_mlp([c.d_model, c.d_model, c.d_model, 4])

    def forward(self, pixels: torch.Tensor, padding: torch.Tensor, prompt: str = "fine") -> dict[str, torch.Tensor]:
        """``pixels`` ``[B, 3, H, W]`` normalised, ``padding`` ``[B, H, W]`` True where padded. Returns
        ``logits`` ``[B, num_queries]`` (against the prompt, before the sigmoid) and ``boxes`` ``[B, num_queries,
        4]`` (cx, cy, w, h normalised to each unpadded image)."""
        if prompt not in PROMPTS:
            raise ValueError(f"unknown prompt {prompt!r}; the UPN has: {', '.join(PROMPTS)}")
        c, t = self.config, self.transformer
        maps = self.backbone(pixels)
        srcs = [proj(m) for proj, m in zip(self.input_proj, maps, strict=False)]
        for level in range(len(maps), c.levels):
            srcs.append(self.input_proj[level](maps[-1] if level == len(maps) else srcs[-1]))
        pads = [F.interpolate(padding[None].float(), size=s.shape[-2:]).bool()[0] for s in srcs]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([(sine_position_code(p, c.d_model // 2, 20.0).to(src.dtype).flatten(2).transpose(1, 2)
                          + t.level_embed[level]) for level, p in enumerate(pads)], 1)  # fmt: skip
        pad = torch.cat([p.flatten(1) for p in pads], 1)
        ratios = torch.stack([valid_ratios(p) for p in pads], 1)  # [B, levels, 2]

        memory = src
        centres = self._cell_centres(shapes, ratios)
        for layer in t.encoder.layers:
            memory = layer(memory, pos, centres, shapes, pad)

        prompt_vec = getattr(t, PROMPTS[prompt]).weight[0]
        proposals, usable = cell_proposals(pads)
        proposals = proposals.masked_fill(~usable[..., None], float("inf"))
        scored = t.enc_output_norm(t.enc_output(memory.masked_fill(~usable[..., None], 0.0)))
        # (a map of fewer cells than queries, which the release cannot take, keeps them all)
        top = torch.topk(scored @ prompt_vec, min(c.num_queries, scored.shape[1]), dim=1).indices
        boxes = torch.gather(t.enc_out_bbox_embed(scored) + proposals, 1, top[..., None].expand(-1, -1, 4))
        reference = boxes.sigmoid()
        tgt = t.tgt_embed.weight[None].expand(src.shape[0], -1, -1)
        box_ratios = torch.cat([ratios, ratios], -1)[:, None]  # [B, 1, levels, 4]
        for layer in t.decoder.layers:
            reference_in = reference[:, :, None] * box_ratios
            query_pos = t.decoder.ref_point_head(box_sine_code(reference_in[:, :, 0], c.d_model // 2))
            tgt = layer(tgt, query_pos, reference_in, memory, shapes, pad)
            previous = reference
            reference = (self.bbox_embed(tgt) + inverse_sigmoid(reference)).sigmoid()
        state = t.decoder.norm(tgt)
        # the release's output boxes refine the last layer's input reference from the normed state
        return {"logits": state @ prompt_vec, "boxes": (self.bbox_embed(state) + inverse_sigmoid(previous)).sigmoid()}

    @staticmethod
    def _cell_centres(shapes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
        """``[B, S, levels, 2]``: every cell's centre, normalised to its unpadded level, seen on each level."""
        centres = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, device=ratios.device),
                                    torch.linspace(0.5, w - 0.5, w, device=ratios.device), indexing="ij")  # fmt: skip
            x = xs.reshape(-1)[None] / (ratios[:, None, level, 0] * w)
            y = ys.reshape(-1)[None] / (ratios[:, None, level, 1] * h)
            centres.append(torch.stack((x, y), -1))
        return torch.cat(centres, 1)[:, :, None] * ratios[:, None]


def resized_size(width: int, height: int, short_side: int, max_side: int) -> tuple[int, int]:
    """(width, height) after the release's resize: the short side to ``short_side`` unless the long side would
    pass ``max_side`` (then the short side shrinks to fit), sides truncated as it truncates them."""
    small, large = float(min(width, height)), float(max(width, height))
    if large / small * short_side > max_side:
        short_side = round(max_side * small / large)
    if (width <= height and width == short_side) or (height <= width and height == short_side):
        return width, height
    if width < height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def image_batch(images: list[np.ndarray], short_side: int, max_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB uint8 images -> ``pixels`` ``[B, 3, H, W]`` (resized, ImageNet-normalised, zero-padded at the bottom
    and right to the largest) and ``padding`` ``[B, H, W]``."""
    resized = []
    for image in images:
        w, h = resized_size(image.shape[1], image.shape[0], short_side, max_side)
        pic = Image.fromarray(image).resize((w, h), BILINEAR)
        x = torch.from_numpy(np.asarray(pic, dtype=np.float32) / 255.0).permute(2, 0, 1)
        resized.append((x - torch.tensor(IMAGE_MEAN)[:, None, None]) / torch.tensor(IMAGE_STD)[:, None, None])
    h, w = max(x.shape[1] for x in resized), max(x.shape[2] for x in resized)
    pixels = torch.zeros(len(resized), 3, h, w)
    padding = torch.ones(len(resized), h, w, dtype=torch.bool)
    for i, x in enumerate(resized):
        pixels[i, :, : x.shape[1], : x.shape[2]] = x
        padding[i, : x.shape[1], : x.shape[2]] = False
    return pixels, padding


class ReleasedUpnProposer:
    """A loaded released UPN, proposing boxes for ``perceive``'s models as ChatRex's demo does: one prompt,
    sigmoid scores at least ``min_score``, then NMS at ``nms_iou``."""

    def __init__(self, model: ReleasedUpn, device: torch.device | str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def propose(self, image: np.ndarray, granularity: str = "fine", min_score: float = 0.3,
                nms_iou: float = 0.8, max_boxes: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """xyxy pixel boxes of ``image`` (RGB uint8 ``[H, W, 3]``) and their scores, best first, at most
        ``max_boxes``: "fine" finds parts and objects alike, "coarse" whole objects (ChatRex's two prompts)."""
        from perceive.boxes import area, clip, convert, denormalize, nms

        if granularity not in PROMPTS:
            raise ValueError(f"unknown granularity {granularity!r}; the released UPN has: {', '.join(PROMPTS)}")
        c = self.model.config
        pixels, padding = image_batch([image], c.short_side, c.max_side)
        # float32 on every device, as the release runs its deformable attention
        out = self.model(pixels.to(self.device), padding.to(self.device), granularity)
        scores = out["logits"][0].float().sigmoid().cpu()
        size = image.shape[:2]
        boxes = denormalize(convert(out["boxes"][0].float().cpu(), "cxcywh", "xyxy"), size)
        keep = scores >= min_score
        boxes, scores = boxes[keep], scores[keep]
        order = nms(boxes, scores, nms_iou)  # on the boxes as predicted, as the release suppresses
        # then clipped to the image, which the release leaves to its user; a box wholly outside is dropped
        boxes, scores = clip(boxes[order], size), scores[order]
        inside = area(boxes) > 0
        boxes, scores = boxes[inside][:max_boxes], scores[inside][:max_boxes]
        return boxes.numpy(), scores.numpy()
