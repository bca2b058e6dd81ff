"""A second pointer hop for expressions about another object: "the circles to the left of the red square",
"the person next to the person in a blue shirt".

Why: the pointer scores each box by its own key, so an answer that depends on where a box lies relative to
an anchor needs the language model to carry the anchor's place into its query and compare it with each
key's place in one dot product, and a threshold such as "entirely to the left of" is no dot product. Here
the query also attends over the boxes to pick an anchor (softly; the answer's loss teaches it which, and
with ``anchor_loss_weight`` the expression's own anchor too), and each box's score gains a learnt reading
of its geometry relative to that anchor: whether it lies left of, right of, above or below it, how near
it is, whether boxes alike it lie between the two, how much of it lies inside the anchor, and whether it
is the anchor itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from perceive.boxes import area, pairwise_intersection
from perceive.models.chatrex.object_order import count_bins

ANCHOR_SOFTNESS = 0.01  # of the image side, as the object order's
NEAR_GAPS = (0.0, 0.1, 0.2)  # of the image side: touching, near, within reach
BETWEEN_BINS = 2  # none, one or more
ANCHOR_GEOMETRY = 4 + len(NEAR_GAPS) + BETWEEN_BINS + 2


def anchor_geometry(
    boxes: torch.Tensor, box_mask: torch.Tensor, alike: torch.Tensor, softness: float = ANCHOR_SOFTNESS
) -> torch.Tensor:
    """``[B, K, K, ANCHOR_GEOMETRY]``: entry (k, j) describes box k as seen from box j, its anchor.

    ``boxes`` are normalised xyxy ``[B, K, 4]``; ``alike`` ``[B, K, K]`` in [0, 1] says how alike two
    boxes are (only "between" reads it: how many boxes alike k have their centre between k's and j's
    along x). Rows and columns of padding (``box_mask`` False) are zero."""
    x0, y0, x1, y1 = (c[..., :, None] for c in boxes.unbind(-1))  # box k along rows
    u0, v0, u1, v1 = (c[..., None, :] for c in boxes.unbind(-1))  # anchor j along columns
    gap = torch.maximum(u0 - x1, x0 - u1)  # along x; negative where the two overlap
    sides = [u0 - x1, x0 - u1, v0 - y1, y0 - v1]  # k wholly left of, right of, above, below j
    feats = [torch.sigmoid(d / softness) for d in sides]
    feats += [torch.sigmoid((near - gap) / softness) for near in NEAR_GAPS]
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    lo = torch.minimum(cx[..., :, None], cx[..., None, :])  # [B, K, K]
    hi = torch.maximum(cx[..., :, None], cx[..., None, :])
    c = cx[..., None, None, :]  # box i, the one that may lie between
    inside = torch.sigmoid((c - lo[..., None]) / softness) * torch.sigmoid((hi[..., None] - c) / softness)
    k = boxes.shape[1]
    eye = torch.eye(k, dtype=boxes.dtype, device=boxes.device)
    present = box_mask.to(boxes.dtype)
    # i counts when alike k, present, and neither k nor j itself: [B, K(k), K(j), K(i)]
    weight = (alike * present[:, None, :] * (1 - eye))[:, :, None, :] * (1 - eye)[None, None, :, :]
    between = (weight * inside).sum(-1)
    feats += list(count_bins(between, BETWEEN_BINS).unbind(-1))
    share_inside = pairwise_intersection(boxes, boxes) / area(boxes)[..., :, None].clamp(min=1e-6)
    feats.append(share_inside)  # of k inside j
    feats.append(eye.expand_as(gap))
    pair = present[:, :, None] * present[:, None, :]
    return torch.stack(feats, dim=-1) * pair[..., None]


class AnchorPointer(nn.Module):
    """Adds to the pointer's score of each box the reading of its geometry relative to a soft anchor."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.reading = nn.Linear(hidden, ANCHOR_GEOMETRY)  # which relation the query asks for, and how much

    def anchor_logits(self, hidden: torch.Tensor, anchor_keys: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, K]`` float: how much each query state takes each box for its anchor, before the softmax;
        padding at the float minimum, not -inf, so an image without boxes gets no NaN."""
        logits = self.query(hidden) @ anchor_keys.transpose(1, 2) / math.sqrt(hidden.shape[-1])
        return logits.float().masked_fill(~box_mask[:, None, :], torch.finfo(torch.float32).min)

    def scores(
        self, hidden: torch.Tensor, anchor_keys: torch.Tensor, geometry: torch.Tensor, box_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B, T, K]`` for query states ``hidden`` ``[B, T, H]``, the boxes' ``anchor_keys`` ``[B, K, H]``
        (``self.key`` of their hidden states) and ``anchor_geometry`` ``[B, K, K, F]``."""
        anchor = self.anchor_logits(hidden, anchor_keys, box_mask).softmax(-1)
        relative = torch.einsum("btj,bkjf->btkf", anchor, geometry.float())
        return torch.einsum("btkf,btf->btk", relative, self.reading(hidden).float())
