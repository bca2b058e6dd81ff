"""The Hungarian matcher and the set losses of the query decoders (DETR, Mask2Former; MVP-LM and REF-VLM use them).

A prediction set (per query: a class log-probability or logit, a box, a mask) is matched one-to-one with the
targets by the assignment of least total cost, the cost being the weighted sum of a class term, the masks' sigmoid
cross-entropy and dice, and the boxes' L1 and generalized IoU (Mask2Former's ``HungarianMatcher`` with DETR's box
terms). ``groups`` restrict matching to within a group: a query of one group (thing queries, stuff queries; the
``<REF>``s of one phrase) is only ever matched with targets of the same group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from perceive.boxes import convert, generalized_box_iou


@dataclass(frozen=True)
class MatchWeights:
    """Each cost term's weight; the same numbers weigh the losses (MVP-LM's released values by default)."""

    cls: float = 2.0
    mask: float = 5.0
    dice: float = 5.0
    l1: float = 5.0
    giou: float = 2.0


def dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, T]`` dice loss of every predicted mask (``[Q, P]`` logits over P pixels) against every target
    (``[T, P]``)."""
    p = logits.sigmoid()
    numerator = 2 * p @ targets.T
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def mask_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[Q, T]`` mean sigmoid cross-entropy of every predicted mask against every target."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[-1]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed dice loss of matched pairs (``[N, P]`` each)."""
    p = logits.sigmoid()
    return (1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)).sum()


def mask_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed (over pairs) mean sigmoid cross-entropy of matched masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1).sum()


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed L1 and (1 - GIoU) of matched boxes, both ``[N, 4]`` normalised ``cxcywh``."""
    l1 = (pred - target).abs().sum()
    giou = generalized_box_iou(convert(pred, "cxcywh", "xyxy"), convert(target, "cxcywh", "xyxy"))
    return l1, (1 - giou.diagonal()).sum()


class HungarianMatcher:
    """One-to-one matching of queries to targets by least total cost (``MatchWeights``).

    ``match(class_cost, pred_boxes, pred_masks, target_boxes, target_masks, query_groups, target_groups)`` for one
    image returns ``(query_indices, target_indices)``. ``class_cost`` ``[Q, T]`` is the class term before weighting
    (e.g. minus the probability of the target's class); boxes are normalised ``cxcywh``; masks are ``[Q, P]``
    logits and ``[T, P]`` binary targets over the same P pixels (either may be None to leave its terms out).
    """

    def __init__(self, weights: MatchWeights | None = None) -> None:
        self.weights = weights or MatchWeights()

    @torch.no_grad()
    def cost(
        self,
        class_cost: torch.Tensor,
        pred_boxes: torch.Tensor | None,
        pred_masks: torch.Tensor | None,
        target_boxes: torch.Tensor | None,
        target_masks: torch.Tensor | None,
    ) -> torch.Tensor:
        w = self.weights
        c = w.cls * class_cost.float()
        if pred_boxes is not None and target_boxes is not None:
            pb, tb = pred_boxes.float(), target_boxes.float()
            c = c + w.l1 * torch.cdist(pb, tb, p=1)
            c = c - w.giou * generalized_box_iou(convert(pb, "cxcywh", "xyxy"), convert(tb, "cxcywh", "xyxy"))
        if pred_masks is not None and target_masks is not None:
            pm, tm = pred_masks.float(), target_masks.float()
            c = c + w.mask * mask_bce_cost(pm, tm) + w.dice * dice_cost(pm, tm)
        return c

    @torch.no_grad()
    def match(
        self,
        class_cost: torch.Tensor,
        pred_boxes: torch.Tensor | None = None,
        pred_masks: torch.Tensor | None = None,
        target_boxes: torch.Tensor | None = None,
        target_masks: torch.Tensor | None = None,
        query_groups: torch.Tensor | None = None,
        target_groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, t = class_cost.shape
        device = class_cost.device  # the indices go back where the predictions are; the assignment runs on the CPU
        empty = torch.zeros(0, dtype=torch.long, device=device)
        if q == 0 or t == 0:
            return empty, empty
        c = self.cost(class_cost, pred_boxes, pred_masks, target_boxes, target_masks).cpu()
        if not torch.isfinite(c).all():  # a diverged prediction must not break the assignment
            c = torch.nan_to_num(c, nan=1e4, posinf=1e4, neginf=-1e4)
        if query_groups is None or target_groups is None:
            rows, cols = linear_sum_assignment(c.numpy())
            return (torch.as_tensor(rows, dtype=torch.long, device=device),
                    torch.as_tensor(cols, dtype=torch.long, device=device))  # fmt: skip
        query_groups, target_groups = query_groups.cpu(), target_groups.cpu()
        qi, ti = [], []
        for g in target_groups.unique().tolist():
            qs = (query_groups == g).nonzero().flatten()
            ts = (target_groups == g).nonzero().flatten()
            if len(qs) == 0:
                continue  # targets of a group without queries stay unmatched
            rows, cols = linear_sum_assignment(c[qs][:, ts].numpy())
            qi.append(qs[torch.as_tensor(rows, dtype=torch.long, device="cpu")])
            ti.append(ts[torch.as_tensor(cols, dtype=torch.long, device="cpu")])
        if not qi:
            return empty, empty
        return torch.cat(qi).to(device), torch.cat(ti).to(device)
