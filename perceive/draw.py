"""Pictures of answers: each grounded phrase's boxes, masks and skeletons in its own colour, labelled;
proposals in grey on request."""

from __future__ import annotations

import colorsys
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceive.keypoints import COCO_PERSON_SKELETON

if TYPE_CHECKING:
    from perceive.answer import Answer

MASK_ALPHA = 0.4  # opacity of a mask's fill
LIMB_WIDTH = 2
POINT_RADIUS = 3


def phrase_colors(phrases: list[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct, stable colour per phrase (golden-ratio hues), the same order everywhere."""
    out: dict[str, tuple[int, int, int]] = {}
    for p in phrases:
        if p not in out:
            r, g, b = colorsys.hsv_to_rgb((len(out) * 0.61803 + 0.02) % 1.0, 0.9, 1.0)
            out[p] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def _clip_segment(
    p: tuple[float, float], q: tuple[float, float], lo: float, hi_x: float, hi_y: float
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The part of segment ``pq`` inside ``[lo, hi_x] x [lo, hi_y]`` (Liang-Barsky), None if none is.

    Keypoints far outside the image would otherwise reach PIL as huge coordinates."""
    (x0, y0), (x1, y1) = p, q
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for den, num in ((-dx, x0 - lo), (dx, hi_x - x0), (-dy, y0 - lo), (dy, hi_y - y0)):
        if den == 0:
            if num < 0:
                return None
            continue
        t = num / den
        if den < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return None
    return (x0 + t0 * dx, y0 + t0 * dy), (x0 + t1 * dx, y0 + t1 * dy)


def _fill_masks(im: Image.Image, answer: Answer, colors: dict[str, tuple[int, int, int]], size: tuple[int, int]):
    """Translucent fills of the objects' masks; ``size`` is the input image's ``(w, h)``."""
    w, h = size
    # A mask must be at the input image's size; one that is not (a model or caller bug) is skipped,
    # rather than stretched or failing the whole picture.
    masks = [(o, o.mask) for o in answer.objects
             if o.mask is not None and [int(v) for v in o.mask.get("size", ())] == [h, w]]  # fmt: skip
    if not masks:
        return im
    from perceive.boxes import rle_to_mask

    arr = np.asarray(im).astype(np.float32)
    for o, rle in masks:
        m = rle_to_mask(rle)
        if (im.width, im.height) != (w, h):
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(im.size, Image.Resampling.NEAREST)) > 0
        arr[m] = arr[m] * (1 - MASK_ALPHA) + np.array(colors[o.phrase], dtype=np.float32) * MASK_ALPHA
    return Image.fromarray(np.round(arr).clip(0, 255).astype(np.uint8))


def _draw_keypoints(d: ImageDraw.ImageDraw, keypoints: list[list[float]], scale: float, color, size: tuple[int, int]):
    """COCO's person skeleton: limbs whose two ends are labelled (v > 0), then the labelled points
    (visible ones filled, occluded ones as rings). Points off the image are clipped or skipped."""
    pts = [
        (x * scale, y * scale) if v > 0 and math.isfinite(x) and math.isfinite(y) else None
        for x, y, v in ((float(k[0]), float(k[1]), float(k[2])) for k in keypoints)
    ]
    w, h = size
    pad = 2 * (POINT_RADIUS + LIMB_WIDTH)
    for a, b in COCO_PERSON_SKELETON:
        if a > len(pts) or b > len(pts):
            continue
        p, q = pts[a - 1], pts[b - 1]
        if p is None or q is None:
            continue
        seg = _clip_segment(p, q, -pad, w + pad, h + pad)
        if seg is not None:
            d.line(seg, fill=color, width=LIMB_WIDTH)
    r = POINT_RADIUS
    for k, pt in zip(keypoints, pts, strict=True):
        if pt is None or not (-r <= pt[0] <= w + r and -r <= pt[1] <= h + r):
            continue
        x, y = pt
        if float(k[2]) >= 2:
            d.ellipse((x - r, y - r, x + r, y + r), fill=color, outline=(0, 0, 0))
        else:
            d.ellipse((x - r, y - r, x + r, y + r), outline=color, width=2)


def draw_answer(image: np.ndarray, answer: Answer, show_proposals: bool = False) -> Image.Image:
    """The image with the answer drawn on it: masks as translucent fills, proposals (on request) in
    grey, each object's box in its phrase's colour, keypoints as COCO's person skeleton, then labels
    ("index: score", or "score" for objects without an index). Small images are enlarged."""
    im = Image.fromarray(image).convert("RGB")
    size = im.size
    scale = max(1.0, 384 / max(im.size))  # small images are enlarged so labels stay legible
    if scale > 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.NEAREST)
    colors = phrase_colors([o.phrase for o in answer.objects])
    im = _fill_masks(im, answer, colors, size)
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        font = ImageFont.load_default()
    if show_proposals:
        for p in answer.proposals:
            x0, y0, x1, y1 = (v * scale for v in p["box"])
            d.rectangle((x0, y0, x1, y1), outline=(150, 150, 150))
    for o in answer.objects:
        x0, y0, x1, y1 = (v * scale for v in o.box)
        d.rectangle((x0, y0, x1, y1), outline=colors[o.phrase], width=2)
    for o in answer.objects:
        if o.keypoints is not None:
            _draw_keypoints(d, o.keypoints, scale, colors[o.phrase], im.size)
    for o in answer.objects:
        x0, y0 = o.box[0] * scale, o.box[1] * scale
        c = colors[o.phrase]
        label = f"{o.score:.2f}" if o.index is None else f"{o.index}: {o.score:.2f}"
        tw = d.textlength(label, font=font)
        d.rectangle((x0, max(0, y0 - 14), x0 + tw + 4, max(14, y0)), fill=c)
        d.text((x0 + 2, max(0, y0 - 14)), label, fill=(0, 0, 0), font=font)
    return im
