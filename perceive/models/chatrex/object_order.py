"""Where each box stands among the alike boxes of its image, counted from the left, the right, the top and
the bottom.

Why: "the second red circle from the left" asks for a rank among the boxes a noun phrase matches. No box's
own features hold it, and under causal attention an object token sees only the boxes before it in the
shuffled list, so the language model would have to count at the answer over tokens that each know only
their own object. Here each box gets, for each way of being alike the configuration names (its
``order_groupings``: the same category, say, or the same category and colour), how many alike boxes come
before it in each direction. Alike is read softly from the model's own attribute heads (the product,
over a grouping's heads, of the dot products of two boxes' class probabilities) and before is a sigmoid
of the centres' offset, so nothing here is told the answer: it counts what the heads see, and the
language model still has to match the count to the question's words.
"""

from __future__ import annotations

import torch

from perceive.boxes import convert

ORDER_DIRECTIONS = ("left", "right", "top", "bottom")
ORDER_SOFTNESS = 0.01  # of the image side: rival centres closer than a few hundredths are told apart softly
ORDER_BINS = 5  # counts 0..3 (the fourth from a side) and "4 or more"


def order_feature_count(groupings: int) -> int:
    """Columns of ``order_features`` for ``groupings`` ways of being alike."""
    return groupings * len(ORDER_DIRECTIONS) * ORDER_BINS


def order_counts(
    boxes: torch.Tensor, box_mask: torch.Tensor, alike: torch.Tensor, softness: float = ORDER_SOFTNESS
) -> torch.Tensor:
    """``[B, K, 4]``: for each box k, the sum over the other present boxes j of ``alike[b, k, j]`` times how
    surely j comes before k from the left, the right, the top and the bottom (``ORDER_DIRECTIONS``).

    ``boxes`` are normalised xyxy ``[B, K, 4]``, ``alike`` is ``[B, K, K]`` in [0, 1]; padding (``box_mask``
    False) neither counts nor is counted."""
    cx, cy = convert(boxes, "xyxy", "cxcywh")[..., :2].unbind(-1)
    key = torch.stack([cx, -cx, cy, -cy], dim=-1)  # [B, K, 4]: a smaller key comes first in its direction
    before = torch.sigmoid((key[:, :, None] - key[:, None, :]) / softness)  # [B, K(k), K(j), 4]: j before k
    present = box_mask.to(alike.dtype)
    others = 1 - torch.eye(boxes.shape[1], dtype=alike.dtype, device=alike.device)
    weight = alike * present[:, :, None] * present[:, None, :] * others
    return (weight[..., None] * before).sum(dim=2)


def count_bins(counts: torch.Tensor, bins: int = ORDER_BINS) -> torch.Tensor:
    """``[..., bins]``: each count spread over the two nearest whole numbers 0..bins-1 (hat functions), the
    last bin taking every count from bins-1 up; a whole count is one-hot."""
    centres = torch.arange(bins, dtype=counts.dtype, device=counts.device)
    return (1 - (counts.clamp(min=0, max=bins - 1)[..., None] - centres).abs()).clamp(min=0)


def order_features(boxes: torch.Tensor, box_mask: torch.Tensor, groupings: list[list[torch.Tensor]]) -> torch.Tensor:
    """``[B, K, order_feature_count(len(groupings))]``: the binned counts of ``order_counts`` for each grouping,
    a grouping being the class probabilities ``[B, K, classes]`` of the attribute heads that must agree; two
    boxes are alike by the product of their agreements."""
    groups = []
    for heads in groupings:
        alike = heads[0] @ heads[0].transpose(1, 2)
        for probs in heads[1:]:
            alike = alike * (probs @ probs.transpose(1, 2))
        groups.append(alike)
    return torch.cat([count_bins(order_counts(boxes, box_mask, g)).flatten(-2) for g in groups], dim=-1)


def order_feature_index(grouping: int, direction: str, count: int) -> int:
    """The column of ``order_features`` that says "``count`` boxes alike by grouping number ``grouping``
    lie before this one from ``direction``" (the last bin for ``ORDER_BINS - 1`` or more)."""
    bin_ = min(count, ORDER_BINS - 1)
    return (grouping * len(ORDER_DIRECTIONS) + ORDER_DIRECTIONS.index(direction)) * ORDER_BINS + bin_
