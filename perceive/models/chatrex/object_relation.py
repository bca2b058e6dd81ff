"""Relation layers over one image's object tokens: each box attends to the other boxes of its image, with an
attention bias per head learnt from the pair's geometry (as Relation Networks for object detection, Hu et
al. 2018), so a token can carry what lies around its object before the language model reads it.

Why: the language model sees the boxes as a shuffled list under causal attention, so an object token knows
nothing of the boxes after it, and "the second circle from the left" or "the person holding a cup" must be
worked out at the answer from tokens that each know only their own object. Here "how many circles lie to my
left" or "which item is at my hand" is one attention step with the geometry in the scores.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from perceive.boxes import pairwise_intersection

GEOMETRY_FEATURES = 9


def pair_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """``[B, K, K, 9]`` for normalised xyxy ``boxes`` ``[B, K, 4]``, entry (i, j) describing box j as seen from
    box i: centre offsets, log size ratios, signed gaps along x and y (negative where they overlap), IoU, and
    the share of each box inside the other."""
    x0, y0, x1, y1 = (c[..., :, None] for c in boxes.unbind(-1))  # box i along rows
    u0, v0, u1, v1 = (c[..., None, :] for c in boxes.unbind(-1))  # box j along columns
    w, h = (x1 - x0).clamp(min=1e-4), (y1 - y0).clamp(min=1e-4)
    uw, vh = (u1 - u0).clamp(min=1e-4), (v1 - v0).clamp(min=1e-4)
    inter = pairwise_intersection(boxes, boxes)
    area_i, area_j = w * h, uw * vh
    feats = [  # offsets and gaps x4, so neighbours a tenth of the image apart differ by O(1)
        2 * (u0 + u1 - x0 - x1),
        2 * (v0 + v1 - y0 - y1),
        torch.log(uw / w) / 4,
        torch.log(vh / h) / 4,
        4 * torch.maximum(u0 - x1, x0 - u1),
        4 * torch.maximum(v0 - y1, y0 - v1),
        inter / (area_i + area_j - inter),
        inter / area_i,
        inter / area_j,
    ]
    return torch.stack(feats, dim=-1)


class ObjectRelationLayer(nn.Module):
    """A pre-norm transformer layer over the boxes of each image, with a geometry bias on the attention."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"the relation layers' width {hidden} must be a multiple of their heads {heads}")
        self.heads = heads
        self.attention_norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.geometry_bias = nn.Sequential(nn.Linear(GEOMETRY_FEATURES, 64), nn.GELU(), nn.Linear(64, heads))
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, tokens: torch.Tensor, geometry: torch.Tensor, readable: torch.Tensor) -> torch.Tensor:
        """``readable`` ``[B, 1, K, K]``: which boxes each box may attend to."""
        b, k, hidden = tokens.shape
        q, key, v = (
            t.reshape(b, k, self.heads, -1).transpose(1, 2) for t in self.qkv(self.attention_norm(tokens)).chunk(3, -1)
        )
        bias = self.geometry_bias(geometry).permute(0, 3, 1, 2)  # [B, heads, K, K]
        bias = bias.masked_fill(~readable, torch.finfo(bias.dtype).min).to(q.dtype)
        mixed = F.scaled_dot_product_attention(q, key, v, attn_mask=bias).transpose(1, 2).reshape(b, k, hidden)
        tokens = tokens + self.out(mixed)
        return tokens + self.mlp(self.mlp_norm(tokens))


class ObjectRelationEncoder(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ObjectRelationLayer(hidden, heads) for _ in range(layers))

    def forward(self, tokens: torch.Tensor, boxes: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        """Object tokens ``[B, K, H]`` of normalised xyxy ``boxes`` ``[B, K, 4]``, each having read the other
        boxes of its image (padding where ``box_mask`` is False stays zero)."""
        geometry = pair_geometry(boxes.float()).to(tokens.dtype)
        # a padded key is never read; a padded row still reads itself, so no row is all masked
        k = boxes.shape[1]
        readable = box_mask[:, None, None, :] | torch.eye(k, dtype=torch.bool, device=boxes.device)
        for layer in self.layers:
            tokens = layer(tokens, geometry, readable)
        return tokens * box_mask[..., None]
