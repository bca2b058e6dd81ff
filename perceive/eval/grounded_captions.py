"""Grounded conversation generation (GCG; GLaMM, Rasheed et al. 2024): a caption whose phrases carry regions, scored
against the true caption's phrases and regions by GLaMM's three measures, for boxes (GCG-box) or masks:

- mIoU: per image, the true regions matched one-to-one with the predicted ones by the assignment of highest total
  IoU; each true region's IoU with its match (0 when unmatched), averaged over all true regions;
- recall: the share of true (phrase, region) pairs with a predicted pair whose region has IoU > 0.5 and whose phrase
  is similar (cosine similarity of sentence embeddings > 0.5: GLaMM uses BERT's, here all-MiniLM-L6-v2, a BERT, by
  default; ``similarity`` replaces it);
- AP50: COCO AP at IoU 0.5 of the predicted regions against the true ones, class-agnostic, each prediction scored 1
  (pycocotools).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from perceive.boxes import pair_iou

Pair = tuple[str, Sequence[float]]  # a phrase and its region's box (xyxy pixels)
Similarity = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # [len(a), len(b)] phrase similarities


def sentence_similarity(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (``perceive.eval.text``'s offline encoder)."""
    from perceive.eval.text import default_encoder

    if not a or not b:
        return np.zeros((len(a), len(b)))
    encoder = default_encoder()
    return encoder.encode(list(a)) @ encoder.encode(list(b)).T


def _ious(gt: Sequence[Pair], pred: Sequence[Pair]) -> np.ndarray:
    return np.array([[pair_iou(g[1], p[1]) for p in pred] for g in gt]).reshape(len(gt), len(pred))


def matched_iou(gt: Sequence[Pair], pred: Sequence[Pair]) -> list[float]:
    """Each true region's IoU with its one-to-one match of highest total IoU (0 unmatched)."""
    if not gt:
        return []
    out = [0.0] * len(gt)
    if pred:
        iou = _ious(gt, pred)
        rows, cols = linear_sum_assignment(-iou)
        for r, c in zip(rows, cols, strict=True):
            out[r] = float(iou[r, c])
    return out


def recalled(gt: Sequence[Pair], pred: Sequence[Pair], similarity: Similarity | None = None,
             iou_threshold: float = 0.5, text_threshold: float = 0.5) -> int:  # fmt: skip
    """How many true pairs a predicted pair recalls (region IoU and phrase similarity both above threshold)."""
    if not gt or not pred:
        return 0
    iou = _ious(gt, pred)
    sim = (similarity or sentence_similarity)([g[0] for g in gt], [p[0] for p in pred])
    return int(((iou > iou_threshold) & (sim > text_threshold)).any(axis=1).sum())


def gcg_scores(samples: Sequence[tuple[Sequence[Pair], Sequence[Pair]]],
               similarity: Similarity | None = None) -> dict[str, float | None]:  # fmt: skip
    """``samples``: per image, (true pairs, predicted pairs). mIoU, recall and AP50 as the module says."""
    from pycocotools.coco import COCO

    from perceive.eval import detection

    ious = [v for gt, pred in samples for v in matched_iou(gt, pred)]
    n_gt = sum(len(gt) for gt, _ in samples)
    if not n_gt:
        return {"mIoU": None, "recall": None, "AP50": None}
    images: list[dict] = []
    anns: list[dict] = []
    results: list[dict] = []
    for image_id, (gt, pred) in enumerate(samples, start=1):
        images.append({"id": image_id})
        for _, (x0, y0, x1, y1) in gt:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})  # fmt: skip
        for _, (x0, y0, x1, y1) in pred:
            results.append({"image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 1.0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "region"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    hits = sum(recalled(gt, pred, similarity) for gt, pred in samples)
    return {"mIoU": float(np.mean(ious)), "recall": hits / n_gt,
            "AP50": detection.coco_ap(coco, results, "bbox")["AP50"]}  # fmt: skip
