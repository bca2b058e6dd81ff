"""Pictures of answers: each grounded phrase's boxes in its own colour, labelled; proposals on request."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def phrase_colors(phrases: list[str]) -> dict[str, tuple[int, int, int]]:
    """A distinct, stable colour per phrase (golden-ratio hues), the same order everywhere."""
    out: dict[str, tuple[int, int, int]] = {}
    for p in phrases:
        if p not in out:
            r, g, b = colorsys.hsv_to_rgb((len(out) * 0.61803 + 0.02) % 1.0, 0.9, 1.0)
            out[p] = (int(r * 255), int(g * 255), int(b * 255))
    return out


def draw_answer(image: np.ndarray, answer, show_proposals: bool = False) -> Image.Image:
    im = Image.fromarray(image).convert("RGB")
    scale = max(1.0, 384 / max(im.size))  # small images are enlarged so labels stay legible
    if scale > 1:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(im)
    try:
        font = ImageFont.load_default(size=12)
    except (TypeError, OSError):  # pragma: no cover - Pillow without FreeType
        font = ImageFont.load_default()
    if show_proposals:
        for p in answer.proposals:
            x0, y0, x1, y1 = (v * scale for v in p["box"])
            d.rectangle((x0, y0, x1, y1), outline=(150, 150, 150))
    colors = phrase_colors([o.phrase for o in answer.objects])
    for o in answer.objects:
        x0, y0, x1, y1 = (v * scale for v in o.box)
        c = colors[o.phrase]
        d.rectangle((x0, y0, x1, y1), outline=c, width=2)
        label = f"{o.index}: {o.score:.2f}"
        tw = d.textlength(label, font=font)
        d.rectangle((x0, max(0, y0 - 14), x0 + tw + 4, max(14, y0)), fill=c)
        d.text((x0 + 2, max(0, y0 - 14)), label, fill=(0, 0, 0), font=font)
    return im
