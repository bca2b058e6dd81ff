"""Visual prompts: a point, a box, a scribble or a mask that a question points at (REF-VLM's ``<region>``).

A prompt is given in the input image's pixels. ``parse_prompt`` reads the command line's form
(``point:X,Y``, ``box:X0,Y0,X1,Y1``, ``scribble:X,Y;X,Y;...``, ``mask:FILE.png``); ``check`` refuses a
prompt that does not fit its image. Models that take prompts rasterise them themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT_KINDS = ("point", "box", "scribble", "mask")


@dataclass
class VisualPrompt:
    kind: str  # one of PROMPT_KINDS
    points: list[tuple[float, float]] | None = None  # point: one (x, y); box: (x0, y0), (x1, y1); scribble: 2 or more
    mask: np.ndarray | None = None  # mask: [H, W] bool at the image's size

    def __post_init__(self) -> None:
        if self.kind not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}; known: {', '.join(PROMPT_KINDS)}")
        if self.kind == "mask":
            if self.mask is None or self.mask.ndim != 2:
                raise ValueError("a mask prompt needs a [H, W] mask")
            self.mask = np.asarray(self.mask).astype(bool)
            if not self.mask.any():
                raise ValueError("a mask prompt is empty (no pixel set)")
            return
        pts = [(float(x), float(y)) for x, y in (self.points or [])]
        if not all(math.isfinite(v) for p in pts for v in p):
            raise ValueError(f"a {self.kind} prompt's coordinates must be finite numbers")
        need = {"point": (1, 1), "box": (2, 2), "scribble": (2, None)}[self.kind]
        if len(pts) < need[0] or (need[1] is not None and len(pts) > need[1]):
            raise ValueError({"point": "a point prompt is one x,y", "box": "a box prompt is x0,y0,x1,y1",
                              "scribble": "a scribble needs at least two points"}[self.kind])  # fmt: skip
        if self.kind == "box" and (pts[1][0] <= pts[0][0] or pts[1][1] <= pts[0][1]):
            raise ValueError(f"a box prompt needs x1 > x0 and y1 > y0, got {pts}")
        self.points = pts

    def check(self, width: int, height: int) -> None:
        """Refuse a prompt that does not fit a ``width`` x ``height`` image."""
        if self.mask is not None:
            if self.mask.shape != (height, width):
                raise ValueError(f"the mask prompt is {self.mask.shape[1]}x{self.mask.shape[0]}; the image is "
                                 f"{width}x{height}")  # fmt: skip
            return
        for x, y in self.points or []:
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"the {self.kind} prompt's point ({x:g}, {y:g}) is outside the {width}x{height} image")


def parse_prompt(text: str) -> VisualPrompt:
    """``point:X,Y``, ``box:X0,Y0,X1,Y1``, ``scribble:X,Y;X,Y;...`` or ``mask:FILE.png`` (non-zero pixels)."""
    kind, sep, body = text.partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in PROMPT_KINDS:
        raise ValueError(f"a prompt is KIND:VALUES with KIND one of {', '.join(PROMPT_KINDS)}, got {text!r}")
    if kind == "mask":
        from PIL import Image

        path = Path(body.strip())
        if not path.is_file():
            raise ValueError(f"no such mask file: {path}")
        try:
            with Image.open(path) as im:
                mask = np.asarray(im.convert("L")) > 0
        except OSError as e:
            raise ValueError(f"{path} is not an image: {e}") from None
        return VisualPrompt("mask", mask=mask)
    try:
        if kind == "scribble":
            points = [tuple(float(v) for v in p.split(",")) for p in body.split(";") if p.strip()]
        else:
            values = [float(v) for v in body.split(",")]
            points = [tuple(values[i : i + 2]) for i in range(0, len(values), 2)]
    except ValueError:
        raise ValueError(f"a {kind} prompt's values must be numbers, got {body!r}") from None
    if any(len(p) != 2 for p in points):
        raise ValueError(f"a {kind} prompt's points are x,y pairs, got {body!r}")
    return VisualPrompt(kind, points=[(p[0], p[1]) for p in points])


def prompts_from_json(data: object) -> list[VisualPrompt]:
    """The API's form: a list of ``{"kind": "point" | "box" | "scribble", "points": [[x, y], ...]}`` (a box is its
    two corners). Anything else is a ``ValueError`` saying what was expected."""
    if not isinstance(data, list):
        raise ValueError(f"prompts must be a JSON list, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or item.get("kind") not in ("point", "box", "scribble"):
            raise ValueError(f"prompt {i + 1} must be an object with kind point, box or scribble")
        points = item.get("points")
        if not isinstance(points, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(v, int | float) for v in p) for p in points
        ):
            raise ValueError(f"prompt {i + 1}'s points must be a list of [x, y] numbers")
        out.append(VisualPrompt(item["kind"], points=[(float(x), float(y)) for x, y in points]))
    return out
