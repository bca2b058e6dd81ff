"""Panoptic quality (Kirillov et al. 2019, as COCO's panopticapi computes it) and semantic mIoU."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

VOID = 0  # segment id of unlabeled pixels
OFFSET = 1 << 32


def _segment_pairs(gt_ids: np.ndarray, pred_ids: np.ndarray) -> dict[tuple[int, int], int]:
    """Pixel counts of every (gt segment, predicted segment) pair."""
    joint = gt_ids.astype(np.int64) * OFFSET + pred_ids.astype(np.int64)
    values, counts = np.unique(joint, return_counts=True)
    return {(int(v // OFFSET), int(v % OFFSET)): int(c) for v, c in zip(values, counts, strict=True)}


class PanopticAccumulator:
    """Collects TP / FP / FN and matched IoU per category over images; ``result()`` gives PQ, SQ, RQ.

    Per image (COCO rules): a ground-truth and a predicted segment of the same category match when
    their IoU > 0.5, where the union leaves out predicted pixels that fall on VOID; matches are
    unique by construction. Unmatched non-crowd ground truth is a FN. An unmatched prediction is a
    FP unless more than half of it lies on VOID or on crowd regions of its category.
    """

    def __init__(self, categories: Sequence[dict]) -> None:
        self.categories = {c["id"]: c for c in categories}
        self.iou: defaultdict[int, float] = defaultdict(float)
        self.tp: defaultdict[int, int] = defaultdict(int)
        self.fp: defaultdict[int, int] = defaultdict(int)
        self.fn: defaultdict[int, int] = defaultdict(int)

    def add(
        self, gt_ids: np.ndarray, gt_segments: Iterable[dict], pred_ids: np.ndarray, pred_segments: Iterable[dict]
    ) -> None:
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"panoptic maps differ in shape: {gt_ids.shape} and {pred_ids.shape}")
        gt_info = {s["id"]: s for s in gt_segments}
        pred_info = {s["id"]: s for s in pred_segments}
        for sid, s in pred_info.items():
            if s["category_id"] not in self.categories:
                raise ValueError(f"predicted segment {sid} has unknown category_id {s['category_id']}")
        gt_area = {sid: int((gt_ids == sid).sum()) for sid in gt_info}
        pred_area = {sid: int((pred_ids == sid).sum()) for sid in pred_info}
        pairs = _segment_pairs(gt_ids, pred_ids)
        matched_gt: set[int] = set()
        matched_pred: set[int] = set()
        for (g, p), inter in pairs.items():
            if g not in gt_info or p not in pred_info:
                continue
            if gt_info[g].get("iscrowd", 0) or gt_info[g]["category_id"] != pred_info[p]["category_id"]:
                continue
            union = pred_area[p] + gt_area[g] - inter - pairs.get((VOID, p), 0)
            iou = inter / union if union else 0.0
            if iou > 0.5:
                cat = gt_info[g]["category_id"]
                self.tp[cat] += 1
                self.iou[cat] += iou
                matched_gt.add(g)
                matched_pred.add(p)
        crowd_by_cat: dict[int, set[int]] = defaultdict(set)
        for g, s in gt_info.items():
            if s.get("iscrowd", 0):
                crowd_by_cat[s["category_id"]].add(g)
            elif g not in matched_gt:
                self.fn[s["category_id"]] += 1
        for p, s in pred_info.items():
            if p in matched_pred or pred_area[p] == 0:
                continue
            ignored = pairs.get((VOID, p), 0) + sum(pairs.get((g, p), 0) for g in crowd_by_cat[s["category_id"]])
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[s["category_id"]] += 1

    def result(self) -> dict:
        per_class = {}
        for cat_id, cat in self.categories.items():
            tp, fp, fn = self.tp[cat_id], self.fp[cat_id], self.fn[cat_id]
            if tp + fp + fn == 0:
                continue  # the category appears nowhere: it does not enter the averages
            denom = tp + 0.5 * fp + 0.5 * fn
            per_class[cat["name"]] = {
                "PQ": self.iou[cat_id] / denom, "SQ": self.iou[cat_id] / tp if tp else 0.0, "RQ": tp / denom,
                "isthing": int(cat.get("isthing", 1)), "tp": tp, "fp": fp, "fn": fn,
            }  # fmt: skip
        out: dict = {}
        for group, keep in (
            ("All", lambda c: True),
            ("Things", lambda c: c["isthing"] == 1),
            ("Stuff", lambda c: c["isthing"] == 0),
        ):
            rows = [c for c in per_class.values() if keep(c)]
            for k in ("PQ", "SQ", "RQ"):
                out[k if group == "All" else f"{k}_{group.lower()}"] = (
                    float(np.mean([r[k] for r in rows])) if rows else None
                )
        out["per_class"] = per_class
        return out


def semantic_confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``[num_classes, num_classes]`` pixel counts (rows: ground truth, columns: prediction)."""
    if gt.shape != pred.shape:
        raise ValueError(f"label maps differ in shape: {gt.shape} and {pred.shape}")
    keep = gt != ignore_index
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if (g < 0).any() or (g >= num_classes).any() or (p < 0).any() or (p >= num_classes).any():
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (or be {ignore_index})")
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> dict:
    """Semantic mIoU: per class TP / (TP + FP + FN), averaged over classes present in the ground truth
    or the prediction (detectron2's rule); classes absent from both are left out."""
    tp = np.diag(confusion).astype(np.float64)
    pos_gt = confusion.sum(axis=1)
    pos_pred = confusion.sum(axis=0)
    valid = (pos_gt + pos_pred) > 0
    iou = np.full(len(tp), np.nan)
    iou[valid] = tp[valid] / (pos_gt + pos_pred - tp)[valid]
    acc = tp.sum() / confusion.sum() if confusion.sum() else 0.0
    return {
        "mIoU": float(np.nanmean(iou)) if valid.any() else 0.0,
        "pixel_accuracy": float(acc),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def mean_iou_with_unlabelled(confusion: np.ndarray) -> float:
    """mIoU of an ``[n + 1, n + 1]`` confusion whose last class is "unlabelled" (pixels a segmentation leaves out,
    never a true class): those pixels are misses of their true class, and the last class is not averaged."""
    per_class = mean_iou(confusion)["per_class_iou"][:-1]
    known = [v for v in per_class if v is not None]
    return float(np.mean(known)) if known else 0.0
