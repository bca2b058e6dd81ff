"""Referring metrics: RefCOCO accuracy, HumanRef recall / precision / density-F1, cIoU and gIoU."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from perceive.boxes import box_iou

THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.95


def _iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).numpy()


def rec_accuracy(
    gt_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float] | None], iou_threshold: float = 0.5
) -> float:
    """Referring expression comprehension accuracy (RefCOCO/+/g): the share of expressions whose one
    predicted box has IoU >= ``iou_threshold`` with the one ground-truth box. A missing prediction
    (``None``) is wrong."""
    if len(gt_boxes) != len(pred_boxes):
        raise ValueError(f"{len(gt_boxes)} ground-truth boxes but {len(pred_boxes)} predictions")
    if not gt_boxes:
        return 0.0
    hits = 0
    for g, p in zip(gt_boxes, pred_boxes, strict=True):
        if p is not None and _iou_matrix([g], [p])[0, 0] >= iou_threshold:
            hits += 1
    return hits / len(gt_boxes)


# ---------------------------------------------------------------------------------------------
# HumanRef (RexSeek)
# ---------------------------------------------------------------------------------------------


def greedy_matches(
    gt_boxes: Sequence[Sequence[float]], pred_boxes: Sequence[Sequence[float]], iou_threshold: float
) -> int:
    """HumanRef's matching: for each ground-truth box in order, the unused prediction of highest IoU
    at or above the threshold (and above 0) is taken."""
    iou = _iou_matrix(gt_boxes, pred_boxes)
    used: set[int] = set()
    matches = 0
    for g in range(len(gt_boxes)):
        best, best_iou = -1, 0.0
        for p in range(len(pred_boxes)):
            if p not in used and iou[g, p] >= iou_threshold and iou[g, p] > best_iou:
                best, best_iou = p, iou[g, p]
        if best >= 0:
            used.add(best)
            matches += 1
    return matches


def point_matches(gt_masks: Sequence[np.ndarray], points: Sequence[Sequence[float]]) -> int:
    """For each ground-truth mask in order, the first unused point inside it. Points are continuous
    pixel coordinates: (x, y) lies in pixel (floor(x), floor(y)). (The reference evaluation rounds
    instead, which reads pixel centres as integers; the world's convention puts them at +0.5.)"""
    used: set[int] = set()
    matches = 0
    for m in gt_masks:
        h, w = m.shape
        for i, (x, y) in enumerate(points):
            xi, yi = int(np.floor(x)), int(np.floor(y))
            if i not in used and 0 <= xi < w and 0 <= yi < h and m[yi, xi]:
                used.add(i)
                matches += 1
                break
    return matches


def density_f1(recall: float, precision: float, n_gt: int, n_pred: int) -> float:
    """RexSeek's density-F1: F1 x min(1, #GT / #predictions), 0 when nothing is predicted. It punishes
    predicting many boxes to fish for recall."""
    if n_pred == 0 or recall + precision == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall) * min(1.0, n_gt / n_pred)


def sample_scores(
    gt_boxes: Sequence[Sequence[float]],
    preds: Sequence[Sequence[float]],
    gt_masks: Sequence[np.ndarray] | None = None,
    points: bool | None = None,
) -> dict[str, float]:
    """One non-rejection sample's scores. Boxes give R/P/DF1 at 0.5 and averaged over 0.5:0.95;
    points (``[x, y]``, needing ``gt_masks``) give R/P/DF1 at "point". ``points`` says which, when
    the sample alone cannot (it predicted nothing)."""
    n_gt, n_pred = len(gt_boxes), len(preds)
    if n_gt == 0:
        raise ValueError("sample_scores is for samples with ground truth; rejections are scored apart")
    if points is None:
        points = bool(n_pred) and len(preds[0]) == 2
    if points:
        if gt_masks is None:
            raise ValueError("point predictions need the ground-truth masks")
        m = point_matches(gt_masks, preds)
        r, p = m / n_gt, (m / n_pred if n_pred else 0.0)
        return {"R@point": r, "P@point": p, "DF1@point": density_f1(r, p, n_gt, n_pred)}
    out: dict[str, float] = {}
    per_t = []
    for t in THRESHOLDS:
        m = greedy_matches(gt_boxes, preds, t) if n_pred else 0
        r, p = m / n_gt, (m / n_pred if n_pred else 0.0)
        per_t.append((r, p, density_f1(r, p, n_gt, n_pred)))
    out["R@0.5"], out["P@0.5"], out["DF1@0.5"] = per_t[0]
    out["R@0.5:0.95"] = float(np.mean([x[0] for x in per_t]))
    out["P@0.5:0.95"] = float(np.mean([x[1] for x in per_t]))
    out["DF1@0.5:0.95"] = float(np.mean([x[2] for x in per_t]))
    return out


def count_bucket(n: int) -> str:
    if n <= 1:
        return "1"
    if n <= 5:
        return "2-5"
    return "6-10" if n <= 10 else ">10"


@dataclass
class HumanRefResult:
    overall: dict[str, float | None]
    by_domain: dict[str, dict[str, float | None]]
    by_sub_domain: dict[str, dict[str, float | None]]
    by_count: dict[str, dict[str, float | None]]
    rejection: dict[str, float]
    # non-rejection samples: "samples", and per "domain:D", "sub_domain:D/S" and "objects:<count bucket>"
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """The ``perceive eval humanref --json`` object: "all", one entry per domain, "rejection"."""
        return {"all": self.overall, **self.by_domain, "rejection": self.rejection}


BOX_KEYS = ("R@0.5", "P@0.5", "DF1@0.5", "R@0.5:0.95", "P@0.5:0.95", "DF1@0.5:0.95")


def _mean(rows: list[dict[str, float]]) -> dict[str, float | None]:
    """Per-key means over samples; with no samples (an all-rejection file) every value is None."""
    if not rows:
        return dict.fromkeys(BOX_KEYS)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def standard_error_bound(mean: float | None, n: int | None) -> float | None:
    """An upper bound on the standard error of a mean of n scores in [0, 1]: such a score's variance
    is at most mean * (1 - mean), the variance of a right-or-wrong score, which most of them are."""
    if mean is None or n is None or n < 2:
        return None
    return float(np.sqrt(mean * (1 - mean) / n))


def humanref(samples: Sequence, predictions: dict[str, list[list[float]]]) -> HumanRefResult:
    """HumanRef evaluation (RexSeek): per-sample scores averaged over samples, overall (non-rejection
    samples), by domain, sub-domain and ground-truth count (1, 2-5, 6-10, >10).

    ``samples`` are ``perceive.data.readers.HumanRefSample``; ``predictions`` maps sample id to its
    predicted boxes (or points). A sample without an entry predicted nothing. Rejection samples
    (no ground truth) are scored apart: correct when nothing is predicted.

    Cases where the public reference evaluation misbehaves, and what happens here instead: it decides
    boxes-versus-points from the first sample's first prediction (and crashes when that list is
    empty) -- here each sample is judged by its own predictions; a non-rejection sample with an empty
    ground truth gets a malformed tuple there -- here such samples are rejections by definition; the
    reference gives point precision 1 when nothing is predicted -- here it is 0, as for boxes.
    """
    from perceive.boxes import rle_to_mask

    lengths = {len(p) for preds in predictions.values() for p in preds if len(p) > 0}
    if lengths - {2, 4}:
        raise ValueError(f"predictions must be [x0, y0, x1, y1] boxes or [x, y] points, got lengths {sorted(lengths)}")
    if lengths == {2, 4}:
        raise ValueError("predictions mix boxes and points; evaluate them separately")
    points = lengths == {2}
    rows: list[tuple[object, dict[str, float]]] = []
    rejection_total = rejection_correct = 0
    for s in samples:
        preds = [p for p in predictions.get(s.id, []) if len(p) > 0]
        if s.is_rejection:
            rejection_total += 1
            rejection_correct += len(preds) == 0
            continue
        masks = [rle_to_mask(r) for r in s.answer_segmentations] if points else None
        rows.append((s, sample_scores(s.answer_boxes, preds, masks, points=points)))
    by_domain: dict[str, list] = defaultdict(list)
    by_sub: dict[str, list] = defaultdict(list)
    by_count: dict[str, list] = defaultdict(list)
    for s, r in rows:
        by_domain[s.domain].append(r)  # type: ignore[attr-defined]
        by_sub[f"{s.domain}/{s.sub_domain}"].append(r)  # type: ignore[attr-defined]
        by_count[count_bucket(len(s.answer_boxes))].append(r)  # type: ignore[attr-defined]
    rate = rejection_correct / rejection_total if rejection_total else 0.0
    return HumanRefResult(
        overall=_mean([r for _, r in rows]),
        by_domain={k: _mean(v) for k, v in sorted(by_domain.items())},
        by_sub_domain={k: _mean(v) for k, v in sorted(by_sub.items())},
        by_count={k: _mean(by_count[k]) for k in ("1", "2-5", "6-10", ">10") if k in by_count},
        rejection={"correct": rejection_correct, "total": rejection_total, "rate": rate},
        counts={
            "samples": len(rows),
            **{f"domain:{k}": len(v) for k, v in by_domain.items()},
            **{f"sub_domain:{k}": len(v) for k, v in by_sub.items()},
            **{f"objects:{k}": len(v) for k, v in by_count.items()},
        },
    )


# ---------------------------------------------------------------------------------------------
# referring segmentation
# ---------------------------------------------------------------------------------------------


def target_accuracies(n_targets: Sequence[int], n_predicted: Sequence[int]) -> dict[str, float | None]:
    """gRefCOCO's (Liu et al. 2023) N-acc: of the expressions with no target, the share answered with nothing; T-acc:
    of those with targets, the share not answered with nothing. None where there is no such expression."""
    if len(n_targets) != len(n_predicted):
        raise ValueError(f"{len(n_targets)} expressions but {len(n_predicted)} answers")
    none = [p == 0 for t, p in zip(n_targets, n_predicted, strict=True) if t == 0]
    some = [p > 0 for t, p in zip(n_targets, n_predicted, strict=True) if t > 0]
    return {"N-acc": sum(none) / len(none) if none else None, "T-acc": sum(some) / len(some) if some else None}


def segmentation_iou(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Referring segmentation: cIoU = cumulative intersection / cumulative union over the set; gIoU =
    mean of per-sample IoU, where a sample whose target and prediction are both empty counts 1 (the
    gRefCOCO convention for no-target expressions)."""
    if len(gt_masks) != len(pred_masks):
        raise ValueError(f"{len(gt_masks)} ground-truth masks but {len(pred_masks)} predictions")
    inter_sum = union_sum = 0
    ious = []
    for g, p in zip(gt_masks, pred_masks, strict=True):
        if g.shape != p.shape:
            raise ValueError(f"mask shapes differ: {g.shape} and {p.shape}")
        inter = int(np.logical_and(g, p).sum())
        union = int(np.logical_or(g, p).sum())
        inter_sum += inter
        union_sum += union
        ious.append(1.0 if union == 0 else inter / union)
    return {"cIoU": inter_sum / union_sum if union_sum else 0.0, "gIoU": float(np.mean(ious)) if ious else 0.0}
