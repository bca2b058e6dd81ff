"""Keypoint metrics: COCO's OKS AP through pycocotools' keypoints mode (not reimplemented), PCK@alpha, and the
template baseline (a dataset's mean pose, relative to the person's box, placed in a predicted box)."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

KEYPOINT_KEYS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def keypoint_ap(gt: Any, results: list[dict]) -> dict[str, float | None]:
    """COCO keypoint AP (OKS, COCO's 17 per-keypoint sigmas): ``gt`` a ``pycocotools.coco.COCO`` whose person
    annotations carry ``keypoints``, ``num_keypoints`` and ``area``; ``results`` ``image_id``, ``category_id``,
    ``keypoints`` (51 numbers) and ``score``. With no results every AP is 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return dict.fromkeys(KEYPOINT_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (None if v < 0 else float(v)) for k, v in zip(KEYPOINT_KEYS, ev.stats, strict=True)}


def pck_hits(gt: Sequence[Sequence[float]], pred: Sequence[Sequence[float]] | None, box: Sequence[float],
             alpha: float = 0.1) -> tuple[int, int]:  # fmt: skip
    """PCK@alpha of one person: (labelled keypoints predicted within ``alpha`` x the longer side of its box,
    labelled keypoints). ``pred`` None (the person was missed): every labelled keypoint is a miss."""
    g = np.asarray(gt, dtype=np.float64).reshape(-1, 3)
    labelled = g[:, 2] > 0
    total = int(labelled.sum())
    if pred is None or total == 0:
        return 0, total
    p = np.asarray(pred, dtype=np.float64).reshape(-1, 3)[:, :2]
    reach = alpha * max(box[2] - box[0], box[3] - box[1])
    dist = np.linalg.norm(p - g[:, :2], axis=1)
    return int(((dist <= reach) & labelled).sum()), total


def keypoint_template(people: Sequence[tuple[Sequence[float], Sequence[Sequence[float]]]]) -> np.ndarray:
    """``[K, 2]``: each keypoint's mean position relative to its person's box (0..1 across it), over the labelled
    keypoints of ``people`` (``(box, keypoints)`` pairs); a keypoint never labelled sits at the box's centre."""
    if not people:
        raise ValueError("a keypoint template needs at least one person")
    n = len(np.asarray(people[0][1]).reshape(-1, 3))
    sums, counts = np.zeros((n, 2)), np.zeros(n)
    for box, kps in people:
        k = np.asarray(kps, dtype=np.float64).reshape(-1, 3)
        w, h = max(box[2] - box[0], 1e-6), max(box[3] - box[1], 1e-6)
        rel = (k[:, :2] - np.array([box[0], box[1]])) / np.array([w, h])
        on = k[:, 2] > 0
        sums[on] += rel[on]
        counts[on] += 1
    out = np.full_like(sums, 0.5)
    seen = counts > 0
    out[seen] = sums[seen] / counts[seen][:, None]
    return out


def place_template(template: np.ndarray, box: Sequence[float]) -> list[list[float]]:
    """The template's keypoints inside ``box`` (xyxy), each marked visible."""
    x0, y0, x1, y1 = box
    return [[float(x0 + u * (x1 - x0)), float(y0 + v * (y1 - y0)), 2] for u, v in template]
