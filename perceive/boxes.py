"""Box math in pure torch: conversions, IoU/GIoU, NMS, box/mask/RLE helpers and RoI Align.

Conventions used everywhere in the project:
- boxes are float tensors of shape ``[..., 4]``;
- ``xyxy`` is ``(x0, y0, x1, y1)`` in pixels with ``x1 >= x0`` (continuous coordinates: a box covering
  pixel columns 0..9 is ``x0=0, x1=10``);
- ``xywh`` is COCO's ``(x0, y0, width, height)``; ``cxcywh`` is ``(centre x, centre y, width, height)``;
- a *normalized* box divides x by the image width and y by the image height.

No torchvision: its compiled ops do not load with the torch this project runs on (see DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

BoxFormat = Literal["xyxy", "xywh", "cxcywh"]
_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_boxes(boxes: torch.Tensor, name: str = "boxes") -> None:
    if not isinstance(boxes, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


def convert(boxes: torch.Tensor, src: BoxFormat, dst: BoxFormat) -> torch.Tensor:
    """Convert boxes between ``xyxy``, ``xywh`` and ``cxcywh`` (pixel or normalized alike)."""
    _check_boxes(boxes)
    for fmt in (src, dst):
        if fmt not in _FORMATS:
            raise ValueError(f"unknown box format {fmt!r}; expected one of {_FORMATS}")
    if src == dst:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if src == "xyxy":
        x0, y0, x1, y1 = a, b, c, d
    elif src == "xywh":
        x0, y0, x1, y1 = a, b, a + c, b + d
    else:
        x0, y0, x1, y1 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    if dst == "xyxy":
        out = (x0, y0, x1, y1)
    elif dst == "xywh":
        out = (x0, y0, x1 - x0, y1 - y0)
    else:
        out = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
    return torch.stack(out, dim=-1)


def _size_tensor(size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"image size must be (height, width) with positive values, got {size}")
    h, w = size
    return torch.tensor([w, h, w, h], dtype=like.dtype, device=like.device)


def normalize(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel boxes to [0, 1] boxes; ``size`` is ``(height, width)``. Works for every format."""
    _check_boxes(boxes)
    return boxes / _size_tensor(size, boxes)


def denormalize(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[0, 1] boxes to pixel boxes; ``size`` is ``(height, width)``. Works for every format."""
    _check_boxes(boxes)
    return boxes * _size_tensor(size, boxes)


def clip(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Clip ``xyxy`` pixel boxes to an image of ``size = (height, width)``."""
    _check_boxes(boxes)
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0.clamp(0, w), y0.clamp(0, h), x1.clamp(0, w), y1.clamp(0, h)), dim=-1)


def area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of ``xyxy`` boxes; degenerate boxes (x1 < x0) have area 0."""
    _check_boxes(boxes)
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def pairwise_intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Intersection areas of ``xyxy`` boxes, ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (leading
    dimensions broadcast)."""
    lt = torch.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _pairwise_inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_boxes(a, "boxes1")
    _check_boxes(b, "boxes2")
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"pairwise IoU takes [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}")
    inter = pairwise_intersection(a, b)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return inter, union


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of ``xyxy`` boxes, ``[N, 4] x [M, 4] -> [N, M]``; 0 where the union is empty."""
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)


def pair_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``xyxy`` boxes given as plain numbers (no tensors: for one pair at a time); 0 for an empty union."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_one_to_one(iou: torch.Tensor, threshold: float = 0.5) -> list[int | None]:
    """For each row (a true object) of an ``[N, M]`` IoU matrix, the column (a proposal) it is matched
    to, or None: the best-covered objects choose first, each takes its best proposal not yet taken,
    and only at IoU >= ``threshold``. A proposal stands for one object at most, as in detection
    evaluation: a flag's box that fits the arm holding it better is the arm's."""
    matched: list[int | None] = [None] * iou.shape[0]
    if iou.shape[1] == 0:
        return matched
    taken = torch.zeros(iou.shape[1], dtype=torch.bool)
    for i in torch.argsort(-iou.max(dim=1).values, stable=True).tolist():
        candidates = iou[i].masked_fill(taken, -1.0)
        j = int(candidates.argmax())
        if candidates[j] >= threshold:
            matched[i] = j
            taken[j] = True
    return matched


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of ``xyxy`` boxes, in [-1, 1]; differentiable."""
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    eps = torch.finfo(union.dtype).eps
    iou = inter / (union + eps)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / (hull + eps)


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    labels: torch.Tensor | None = None,
    max_keep: int | None = None,
) -> torch.Tensor:
    """Greedy non-maximum suppression; returns kept indices sorted by decreasing score.

    A box is dropped when its IoU with a higher-scoring kept box is *greater than* ``iou_threshold``
    (torchvision's rule). With ``labels`` the suppression is class-aware: boxes of different labels
    never suppress each other. ``max_keep`` caps the number of boxes returned.
    """
    _check_boxes(boxes)
    if boxes.ndim != 2:
        raise ValueError(f"nms takes boxes of shape [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if labels is not None and labels.shape != boxes.shape[:1]:
        raise ValueError(f"labels must have shape [{boxes.shape[0]}], got {tuple(labels.shape)}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if max_keep is not None and max_keep < 0:
        raise ValueError(f"max_keep must be >= 0, got {max_keep}")
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    iou = box_iou(boxes[order], boxes[order])
    if labels is not None:
        sorted_labels = labels[order]
        iou = iou * (sorted_labels[:, None] == sorted_labels[None, :])
    over = (iou > iou_threshold).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: list[int] = []
    limit = len(order) if max_keep is None else max_keep
    for i in range(len(order)):
        if len(keep) >= limit:
            break
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= over[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


# ---------------------------------------------------------------------------------------------
# Boxes, masks and COCO run-length encoding
# ---------------------------------------------------------------------------------------------


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``xyxy`` boxes (continuous pixel edges) of ``[N, H, W]`` boolean masks; empty masks give zeros."""
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [N, H, W], got {tuple(masks.shape)}")
    out = torch.zeros(masks.shape[0], 4, dtype=torch.float32, device=masks.device)
    for i, m in enumerate(masks.bool()):
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs):
            out[i] = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    return out


def box_to_mask(box: Sequence[float] | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boolean ``[H, W]`` mask of the pixels whose centres lie inside an ``xyxy`` box."""
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has a non-finite value: {[x0, y0, x1, y1]}")
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def mask_to_rle(mask: np.ndarray | torch.Tensor) -> dict:
    """COCO compressed RLE (``{"size": [h, w], "counts": str}``) of one boolean ``[H, W]`` mask."""
    from pycocotools import mask as coco_mask

    arr = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {arr.shape}")
    rle = coco_mask.encode(np.asfortranarray(arr.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode COCO RLE, compressed (``counts`` is a string) or uncompressed (a list), to a bool mask."""
    from pycocotools import mask as coco_mask

    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' and 'counts'")
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        if sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, expected {h * w}")
        compressed = coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        compressed = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(compressed).astype(bool)


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO *uncompressed* RLE: column-major run lengths starting with a run of zeros."""
    arr = np.asarray(mask, dtype=bool)
    if arr.ndim != 2:
        raise ValueError(f"mask must have shape [H, W], got {arr.shape}")
    flat = arr.flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(arr.shape), "counts": [int(c) for c in counts]}


def rle_area(rle: dict) -> int:
    return int(rle_to_mask(rle).sum())


def rle_to_box(rle: dict) -> list[float]:
    """Tight ``xyxy`` box of an RLE mask, ``[0, 0, 0, 0]`` when empty."""
    m = torch.from_numpy(rle_to_mask(rle))[None]
    return masks_to_boxes(m)[0].tolist()


# ---------------------------------------------------------------------------------------------
# RoI Align
# ---------------------------------------------------------------------------------------------


def _rois_from(boxes: torch.Tensor | Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Normalise RoI Align's ``boxes`` argument to a ``[K, 5]`` tensor of (batch index, x0, y0, x1, y1)."""
    if isinstance(boxes, torch.Tensor):
        if boxes.ndim != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"boxes as a tensor must have shape [K, 5] (batch_index, x0, y0, x1, y1), got {tuple(boxes.shape)}"
            )
        return boxes.to(like.dtype)
    parts = []
    for i, b in enumerate(boxes):
        if not isinstance(b, torch.Tensor) or b.ndim != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"boxes[{i}] must be a [K_i, 4] tensor of xyxy boxes, got {shape}")
        parts.append(torch.cat([torch.full_like(b[:, :1], i), b], dim=1).to(like.dtype))
    if not parts:
        return torch.zeros(0, 5, dtype=like.dtype, device=like.device)
    return torch.cat(parts, dim=0)


def roi_align(
    input: torch.Tensor,
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """RoI Align with the call and semantics of ``torchvision.ops.roi_align``, built on ``grid_sample``.

    ``input`` is ``[N, C, H, W]``; ``boxes`` is a ``[K, 5]`` tensor of ``(batch_index, x0, y0, x1, y1)``
    or a list of ``N`` per-image ``[K_i, 4]`` tensors, in input-image coordinates that ``spatial_scale``
    maps onto the feature map. Each output bin averages ``gh x gw`` bilinear samples taken at the centres
    of a regular sub-grid, where ``gh = sampling_ratio`` or, when it is <= 0, ``ceil(roi_height / out_h)``
    (per RoI, as torchvision does; a RoI whose grid is then 0 along a side pools to 0). ``aligned=True``
    shifts boxes by -0.5 pixel so that a box's edges sit on pixel edges (Detectron2's fix); with
    ``aligned=False`` RoIs are at least 1x1, so only aligned RoIs of zero or negative size have an
    empty grid. Samples more than one pixel outside the map are zero; those within one pixel are
    clamped to the border.
    Returns ``[K, C, out_h, out_w]``, differentiable with respect to ``input``.
    """
    if input.ndim != 4:
        raise ValueError(f"input must have shape [N, C, H, W], got {tuple(input.shape)}")
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"output_size must be positive, got {output_size}")
    rois = _rois_from(boxes, input)
    n, c, height, width = input.shape
    k = rois.shape[0]
    out = input.new_zeros(k, c, out_h, out_w)
    if k == 0:
        return out
    batch_idx = rois[:, 0].round().long()
    if batch_idx.min() < 0 or batch_idx.max() >= n:
        raise ValueError(f"box batch indices must be in [0, {n - 1}], got {batch_idx.unique().tolist()}")
    if not torch.isfinite(rois).all():
        raise ValueError("boxes contain NaN or infinite values")

    offset = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - offset
    start_y = rois[:, 2] * spatial_scale - offset
    roi_w = rois[:, 3] * spatial_scale - offset - start_x
    roi_h = rois[:, 4] * spatial_scale - offset - start_y
    if not aligned:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / out_w
    bin_h = roi_h / out_h
    if sampling_ratio > 0:
        grid_h = torch.full((k,), sampling_ratio, dtype=torch.long)
        grid_w = grid_h.clone()
    else:
        # No clamp to 1: torchvision's loops run zero times on a zero (or negative) grid and its
        # count is max(gh * gw, 1), so a zero-width or zero-height aligned RoI pools to 0.
        grid_h = torch.ceil(roi_h / out_h).long().clamp(min=0).cpu()
        grid_w = torch.ceil(roi_w / out_w).long().clamp(min=0).cpu()

    # RoIs are grouped by sub-grid size; each group is one grid_sample call over every image, the
    # RoIs of an image side by side in its output rows (one call instead of one per image: a
    # training batch has 16 images and four levels).
    keys = torch.stack([grid_h, grid_w], dim=1)
    for key in torch.unique(keys, dim=0):
        gh, gw = (int(v) for v in key)
        if gh == 0 or gw == 0:
            continue  # an empty sub-grid: the output stays 0
        sel = torch.nonzero((keys == key).all(dim=1), as_tuple=True)[0].to(input.device)
        iy = (
            torch.arange(out_h, device=input.device, dtype=input.dtype)[:, None] * gh
            + torch.arange(gh, device=input.device, dtype=input.dtype)[None, :]
            + 0.5
        ) / gh  # [out_h, gh]
        ix = (
            torch.arange(out_w, device=input.device, dtype=input.dtype)[:, None] * gw
            + torch.arange(gw, device=input.device, dtype=input.dtype)[None, :]
            + 0.5
        ) / gw
        ys = start_y[sel, None, None] + iy[None] * bin_h[sel, None, None]  # [k', out_h, gh]
        xs = start_x[sel, None, None] + ix[None] * bin_w[sel, None, None]  # [k', out_w, gw]
        valid_y = (ys >= -1.0) & (ys <= height)
        valid_x = (xs >= -1.0) & (xs <= width)
        ys = ys.clamp(0, height - 1)
        xs = xs.clamp(0, width - 1)
        gy = ys / (height - 1) * 2 - 1 if height > 1 else torch.zeros_like(ys)
        gx = xs / (width - 1) * 2 - 1 if width > 1 else torch.zeros_like(xs)
        kk = len(sel)
        grid = torch.stack(
            [
                gx[:, None, None, :, :].expand(kk, out_h, gh, out_w, gw),
                gy[:, :, :, None, None].expand(kk, out_h, gh, out_w, gw),
            ],
            dim=-1,
        ).reshape(kk, out_h * gh, out_w * gw, 2)
        image = batch_idx[sel]
        counts = torch.bincount(image, minlength=n)
        order = torch.argsort(image, stable=True)
        slot = torch.empty_like(order)
        slot[order] = torch.arange(kk, device=input.device) - (torch.cumsum(counts, 0) - counts)[image[order]]
        per_image = grid.new_zeros(n, int(counts.max()), out_h * gh, out_w * gw, 2)
        per_image[image, slot] = grid
        sampled = F.grid_sample(input, per_image.flatten(1, 2), mode="bilinear", padding_mode="border",
                                align_corners=True)  # fmt: skip
        sampled = sampled.reshape(n, c, -1, out_h, gh, out_w, gw)[image, :, slot]  # [k', c, out_h, gh, out_w, gw]
        weight = (valid_y[:, :, :, None, None] & valid_x[:, None, None, :, :]).to(input.dtype)
        out[sel] = (sampled * weight[:, None]).sum(dim=(3, 5)) / (gh * gw)
    return out


def multi_level_roi_align(
    features: Sequence[torch.Tensor],
    boxes: torch.Tensor | Sequence[torch.Tensor],
    output_size: int | tuple[int, int],
    strides: Sequence[int],
    sampling_ratio: int = 2,
    aligned: bool = True,
    reduce: Literal["mean", "concat", "none"] = "mean",
) -> torch.Tensor:
    """RoI Align over every level of a feature pyramid, as ChatRex's object encoder pools.

    ``features[l]`` is ``[N, C_l, H_l, W_l]`` with stride ``strides[l]`` relative to the image the boxes
    are in. ``reduce="none"`` returns a list-like ``[K, L, C, h, w]`` stack (levels must share C),
    ``"mean"`` averages the levels, ``"concat"`` concatenates them along channels.
    """
    if len(features) == 0 or len(features) != len(strides):
        raise ValueError(f"need one stride per feature level, got {len(features)} levels and {len(strides)} strides")
    pooled = [
        roi_align(f, boxes, output_size, 1.0 / s, sampling_ratio=sampling_ratio, aligned=aligned)
        for f, s in zip(features, strides, strict=True)
    ]
    if reduce == "concat":
        return torch.cat(pooled, dim=1)
    channels = {p.shape[1] for p in pooled}
    if len(channels) != 1:
        raise ValueError(f"reduce={reduce!r} needs levels with equal channels, got {sorted(channels)}")
    stacked = torch.stack(pooled, dim=1)
    if reduce == "none":
        return stacked
    if reduce == "mean":
        return stacked.mean(dim=1)
    raise ValueError(f"unknown reduce {reduce!r}; expected 'mean', 'concat' or 'none'")


def check_pixel_boxes(boxes, where: str = "boxes") -> np.ndarray:
    """User-given xyxy boxes as ``[N, 4]`` float64 (one flat box too), after refusing what is not: a wrong
    shape, a value that is not a finite number, x1 < x0 or y1 < y0."""
    try:
        b = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a list of [x0, y0, x1, y1] numbers") from None
    if b.size == 0:
        return b.reshape(0, 4)
    if b.shape == (4,):  # one box given flat
        b = b[None]
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{where} must be a list of [x0, y0, x1, y1] boxes, got shape {list(b.shape)}")
    if not np.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError(f"{where} must be finite [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0")
    return b


def coco_mask_to_array(mask: dict | list, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (RLE, compressed or not, or polygons) as a bool ``[height, width]`` mask."""
    if isinstance(mask, dict):
        out = rle_to_mask(mask)
        if out.shape != (height, width):
            raise ValueError(f"the mask is {out.shape[1]} x {out.shape[0]}, the image {width} x {height}")
        return out
    from pycocotools import mask as coco_mask

    polygons = [[float(v) for v in ring] for ring in mask]
    return coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))).astype(bool)
