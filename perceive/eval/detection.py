"""Detection metrics: COCO AP, LVIS AP by frequency group, and ChatRex's P@0.5 / R@0.5 (micro-averaged, and per
category above a score threshold as ChatRex's maintainers average them).

Values are fractions in [0, 1]; ``None`` stands where a metric is undefined (for example APs on a
set without small objects: pycocotools' -1).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from perceive.boxes import box_iou

COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _defined(v: float) -> float | None:
    return None if v < 0 else float(v)


def coco_ap(gt: Any, results: list[dict], iou_type: str = "bbox") -> dict:
    """COCO box or mask AP through pycocotools' ``COCOeval`` (Lin et al. 2014), not reimplemented.

    ``gt`` is a ``pycocotools.coco.COCO``; ``results`` are COCO results (``image_id``,
    ``category_id``, ``bbox`` as ``[x, y, w, h]`` or ``segmentation``, ``score``). Returns the twelve
    summary numbers and ``pr_curve``: precision at 101 recall points, IoU 0.5, all areas, 100
    detections, averaged over categories with ground truth. With no results every AP is 0.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if not results:
        return {**dict.fromkeys(COCO_KEYS, 0.0), "pr_curve": [0.0] * 101}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; stdout may carry JSON
        dt = gt.loadRes(copy.deepcopy(results))  # loadRes writes ids and areas into the dicts
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out: dict[str, Any] = {k: _defined(v) for k, v in zip(COCO_KEYS, ev.stats, strict=True)}
    precision = ev.eval["precision"][0, :, :, 0, -1]  # [recall points, categories]
    curve = [float(row[row > -1].mean()) if (row > -1).any() else 0.0 for row in precision]
    out["pr_curve"] = curve
    return out


def lvis_ap(gt_dataset: dict, results: list[dict], iou_type: str = "bbox") -> dict:
    """LVIS AP (Gupta et al. 2019) with rare / common / frequent groups, via faster-coco-eval's LVIS mode.

    ``gt_dataset`` is an LVIS-style dict: categories carry ``frequency`` ("r", "c" or "f"), images
    may carry ``neg_category_ids`` and ``not_exhaustive_category_ids`` (federated evaluation: a
    detection of a category neither annotated nor listed as negative for an image is ignored).
    Up to 300 detections per image count, as in LVIS.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    if not results:
        return dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR"), 0.0)
    for c in gt_dataset.get("categories", []):
        if c.get("frequency") not in ("r", "c", "f"):
            raise ValueError(f"LVIS category {c.get('id')} needs a 'frequency' of 'r', 'c' or 'f'")
    gt = COCO(copy.deepcopy(gt_dataset))
    dt = gt.loadRes(copy.deepcopy(results))
    ev = COCOeval_faster(gt, dt, iou_type, lvis_style=True, print_function=lambda *a, **k: None)
    ev.params.maxDets = [1, 10, 300]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    s = ev.stats_as_dict
    names = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
             "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf", "AR": "AR_third"}  # fmt: skip
    return {k: _defined(s[v]) for k, v in names.items()}


def match_one_to_one(gt: np.ndarray, pred: np.ndarray, iou_threshold: float) -> int:
    """Most matches between ``[G, 4]`` and ``[P, 4]`` xyxy boxes, each used once, at IoU >= threshold.

    A maximum bipartite matching (Hungarian algorithm); among matchings of the same size the one
    with the highest IoU sum is taken, which does not change the count.
    """
    if len(gt) == 0 or len(pred) == 0:
        return 0
    iou = box_iou(torch.as_tensor(gt, dtype=torch.float64), torch.as_tensor(pred, dtype=torch.float64)).numpy()
    valid = iou >= iou_threshold
    big = min(len(gt), len(pred)) + 1  # one more match always outweighs any IoU sum
    rows, cols = linear_sum_assignment(-(valid * (big + iou)))
    return int(valid[rows, cols].sum())


def _boxes_by_image_and_category(gt: Any, results: list[dict]) -> tuple[dict, dict]:
    """``xyxy`` boxes of the non-crowd ground truth and of the results, keyed by (image id, category id)."""
    gt_boxes: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for ann in gt.dataset["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            gt_boxes[(ann["image_id"], ann["category_id"])].append([x, y, x + w, y + h])
    pred_boxes: dict[tuple[int, int], list[list[float]]] = defaultdict(list)
    for r in results:
        x, y, w, h = r["bbox"]
        pred_boxes[(r["image_id"], r["category_id"])].append([x, y, x + w, y + h])
    return gt_boxes, pred_boxes


def precision_recall(gt: Any, results: list[dict], iou_threshold: float = 0.5) -> dict:
    """ChatRex's P@0.5 and R@0.5 for boxes without scores (ChatRex Sec. 5.1, Tab. 2).

    Rule (the paper does not spell one out; this is documented here): per image and category,
    predictions and ground truth are matched one to one at IoU >= ``iou_threshold`` with the most
    matches possible (``match_one_to_one``); crowd ground truth is left out. Precision is matches
    over all predictions and recall matches over all ground truth, summed over the whole set
    (micro average). Scores, if present, are ignored. No predictions: precision is 0.
    """
    gt_boxes, pred_boxes = _boxes_by_image_and_category(gt, results)
    tp = 0
    for key in set(gt_boxes) & set(pred_boxes):
        tp += match_one_to_one(np.array(gt_boxes[key]), np.array(pred_boxes[key]), iou_threshold)
    n_gt = sum(len(v) for v in gt_boxes.values())
    n_pred = sum(len(v) for v in pred_boxes.values())
    t = f"{iou_threshold:g}"
    return {
        f"P@{t}": tp / n_pred if n_pred else 0.0,
        f"R@{t}": tp / n_gt if n_gt else 0.0,
        "matches": tp,
        "predictions": n_pred,
        "ground_truth": n_gt,
    }


def per_category_precision_recall(
    gt: Any, results: list[dict], iou_threshold: float = 0.5, score_threshold: float = 0.3
) -> dict:
    """P@0.5 and R@0.5 averaged over categories, on results scoring at least ``score_threshold``: the
    protocol ChatRex's maintainers describe for Tab. 2 (IDEA-Research/ChatRex issue 3: precision and recall at
    IoU 0.5, computed per class, then averaged over the classes; a score threshold of 0.3 for ChatRex).

    Rule (the maintainers do not say which classes enter the average nor what an undefined ratio counts;
    this follows scikit-learn's macro average, ``precision_recall_fscore_support(average="macro",
    zero_division=0)``): results with a score under ``score_threshold`` are dropped; per category,
    predictions and non-crowd ground truth are matched one to one in each image as ``precision_recall``
    does, and the matches, predictions and ground truth are summed over the images; precision_c = matches /
    predictions and recall_c = matches / ground truth, 0 where the denominator is 0; both are averaged over
    the categories that have ground truth or a kept prediction. Every result needs a ``score``.
    """
    kept = []
    for i, r in enumerate(results):
        if "score" not in r:
            raise ValueError(f"result {i} has no score; the per-category protocol drops results by score")
        if r["score"] >= score_threshold:
            kept.append(r)
    gt_boxes, pred_boxes = _boxes_by_image_and_category(gt, kept)
    counts: dict[int, dict[str, int]] = defaultdict(lambda: {"matches": 0, "predictions": 0, "ground_truth": 0})
    for (_, category), boxes in gt_boxes.items():
        counts[category]["ground_truth"] += len(boxes)
    for key, boxes in pred_boxes.items():
        counts[key[1]]["predictions"] += len(boxes)
        if key in gt_boxes:
            counts[key[1]]["matches"] += match_one_to_one(np.array(gt_boxes[key]), np.array(boxes), iou_threshold)
    t = f"{iou_threshold:g}"
    by_category = {
        category: {
            f"P@{t}": c["matches"] / c["predictions"] if c["predictions"] else 0.0,
            f"R@{t}": c["matches"] / c["ground_truth"] if c["ground_truth"] else 0.0,
            **c,
        }
        for category, c in sorted(counts.items())
    }
    return {
        f"P@{t}": float(np.mean([c[f"P@{t}"] for c in by_category.values()])) if by_category else 0.0,
        f"R@{t}": float(np.mean([c[f"R@{t}"] for c in by_category.values()])) if by_category else 0.0,
        "categories": len(by_category),
        "score_threshold": score_threshold,
        "by_category": by_category,
    }
