"""Pictures of the world: scenes with masks, boxes and a few referring expressions drawn."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from perceive.world.language import SceneLanguage
from perceive.world.scene import SKELETON, Scene

EXPRESSION_COLORS = [(255, 40, 40), (30, 200, 255), (255, 200, 0), (190, 90, 255)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # pragma: no cover - Pillow built without FreeType
        return ImageFont.load_default()


def pick_expressions(lang: SceneLanguage, n: int) -> list:
    """Up to ``n`` expressions from different domains, multi-instance ones first."""
    order = ["position", "interaction", "reasoning", "property", "rejection"]
    by_domain: dict[str, list] = {}
    for e in sorted(lang.expressions, key=lambda e: -len(e.answer)):
        by_domain.setdefault(e.domain, []).append(e)
    picked = [by_domain[d][0] for d in order if d in by_domain][:n]
    return picked


def draw_scene(
    scene: Scene,
    lang: SceneLanguage | None = None,
    cell: int = 256,
    n_expressions: int = 3,
    show_parts: bool = False,
    show_keypoints: bool = True,
) -> Image.Image:
    """One panel: the scene with tinted instance masks and boxes; under it, expressions whose
    answer boxes are drawn in the expression's colour."""
    scale = cell / scene.size
    exprs = pick_expressions(lang, n_expressions) if lang is not None else []
    img = scene.image.astype(np.float32)
    for k, e in enumerate(exprs):  # answer masks, tinted lightly in their expression's colour
        tint = np.array(EXPRESSION_COLORS[k % len(EXPRESSION_COLORS)], dtype=np.float32)
        for i in e.answer:
            m = scene.mask(i)
            img[m] = img[m] * 0.7 + tint * 0.3
    base = Image.fromarray(img.astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
    font = _font(11)
    lines: list[tuple[tuple[int, int, int], str]] = []
    for k, e in enumerate(exprs):
        wrapped = textwrap.wrap(f"{e.text} [{e.domain}: {len(e.answer)}]", width=cell // 6)
        lines += [(EXPRESSION_COLORS[k % len(EXPRESSION_COLORS)], w) for w in wrapped]
    panel = Image.new("RGB", (cell, cell + 14 * len(lines) + 6), (255, 255, 255))
    panel.paste(base, (0, 0))
    d = ImageDraw.Draw(panel)
    for o in scene.objects:
        if o.kind == "part" and not show_parts:
            continue
        x0, y0, x1, y1 = (v * scale for v in o.box)
        d.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255) if o.kind != "part" else (120, 120, 120))
        if o.kind == "person" and show_keypoints:
            pts = [(x * scale, y * scale, v) for x, y, v in o.keypoints]
            for a, b in SKELETON:
                if pts[a - 1][2] and pts[b - 1][2]:
                    d.line((pts[a - 1][:2], pts[b - 1][:2]), fill=(0, 255, 120), width=1)
    for k, e in enumerate(exprs):
        color = EXPRESSION_COLORS[k % len(EXPRESSION_COLORS)]
        for i in e.answer:
            x0, y0, x1, y1 = (v * scale for v in scene.get(i).box)
            d.rectangle((x0 - k, y0 - k, x1 - 1 + k, y1 - 1 + k), outline=color, width=2)
    y = cell + 3
    for color, text in lines:
        d.rectangle((3, y + 3, 9, y + 9), fill=color)
        d.text((13, y), text, fill=(0, 0, 0), font=font)
        y += 14
    return panel


def contact_sheet(panels: list[Image.Image], columns: int = 4, pad: int = 6) -> Image.Image:
    if not panels:
        raise ValueError("a contact sheet needs at least one panel")
    w = max(p.width for p in panels)
    rows = [panels[i : i + columns] for i in range(0, len(panels), columns)]
    heights = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (columns * (w + pad) + pad, sum(heights) + pad * (len(rows) + 1)), (235, 235, 235))
    y = pad
    for row, h in zip(rows, heights, strict=True):
        for c, p in enumerate(row):
            sheet.paste(p, (pad + c * (w + pad), y))
        y += h + pad
    return sheet
