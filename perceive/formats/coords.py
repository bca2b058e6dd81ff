"""Boxes written as text: the coordinate baseline the retrieval papers argue against.

Two styles are read and written:

- inline lists after a phrase (Shikra / Qwen-VL style): ``red circle [12, 40, 57, 88]``, either in
  image pixels or quantized to 1000 bins (0-999) per axis;
- the Qwen2.5-VL JSON list: ``[{"bbox_2d": [x0, y0, x1, y1], "label": "red circle"}, ...]`` in pixels,
  often wrapped in a ```json fence.

Quantization: ``bin = floor(v / extent * 1000)`` clipped to 0..999; dequantization returns the bin's
centre, ``(bin + 0.5) * extent / 1000``, so a round trip moves a coordinate by at most
``extent / 2000`` (half a bin). Parsing never raises and takes time linear in the text; unreadable or
impossible boxes are reported, among them any coordinate that is not a finite float (``1e400``, a 400-digit
number, ``NaN``), so every box parsed can be written as strict JSON. JSON nested deeper than
``MAX_JSON_DEPTH`` is not decoded (Python's decoder recurses once per level).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

BINS = 1000
Units = Literal["pixels", "bins"]

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")
_SEPARATORS = " \t\n,;:.-"
SHOWN_CHARS = 60
MAX_JSON_DEPTH = 100  # a Qwen2.5-VL answer is 3 deep (list, object, bbox_2d)


@dataclass(frozen=True)
class TextBox:
    phrase: str
    box: tuple[float, float, float, float]  # xyxy, in the units that were parsed
    span: tuple[int, int] = field(default=(0, 0), compare=False)  # of the box text in the input


@dataclass(frozen=True)
class CoordAnswer:
    boxes: tuple[TextBox, ...] = ()
    problems: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        return {
            "boxes": [{"phrase": b.phrase, "box": list(b.box), "span": list(b.span)} for b in self.boxes],
            "problems": list(self.problems),
        }


def quantize(box: Sequence[float], size: tuple[int, int], bins: int = BINS) -> tuple[int, int, int, int]:
    """Pixel ``xyxy`` box to integer bins; ``size`` is ``(height, width)``."""
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if len(box) != 4 or not all(math.isfinite(float(v)) for v in box):
        raise ValueError(f"box must be 4 finite numbers, got {list(box)}")
    extents = (w, h, w, h)
    return tuple(min(bins - 1, max(0, math.floor(float(v) / e * bins))) for v, e in zip(box, extents, strict=True))  # type: ignore[return-value]


def dequantize(box: Sequence[float], size: tuple[int, int], bins: int = BINS) -> tuple[float, float, float, float]:
    """Bins back to pixels at each bin's centre."""
    h, w = size
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    extents = (w, h, w, h)
    return tuple((float(v) + 0.5) * e / bins for v, e in zip(box, extents, strict=True))  # type: ignore[return-value]


def _shown(s: str) -> str:
    """``s`` for a problem message, cut so that a huge box or label is not copied into the report."""
    return s if len(s) <= SHOWN_CHARS else s[: SHOWN_CHARS - 3] + "..."


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def render(boxes: Sequence[TextBox], sep: str = "; ") -> str:
    """``phrase [x0, y0, x1, y1]`` items; consecutive boxes of one phrase share it: ``circle [..], [..]``."""
    out: list[str] = []
    prev: str | None = None
    for b in boxes:
        coords = "[" + ", ".join(_fmt(v) for v in b.box) + "]"
        if b.phrase == prev:
            out[-1] += ", " + coords
        else:
            out.append(f"{b.phrase} {coords}" if b.phrase else coords)
        prev = b.phrase
    return sep.join(out)


def parse(text: str, units: Units = "pixels", size: tuple[int, int] | None = None) -> CoordAnswer:
    """Read ``phrase [x0, y0, x1, y1]`` boxes. A box with no phrase of its own shares the previous one.

    With ``units="bins"`` values must lie in 0..999; with ``size=(h, w)`` and pixels they must lie in
    the image (a little slack of one pixel). Boxes with x1 < x0 or y1 < y0 are dropped and reported.
    """
    if not isinstance(text, str):
        return CoordAnswer(problems=(f"expected text, got {type(text).__name__}",))
    boxes: list[TextBox] = []
    problems: list[str] = []
    prev_end = 0
    phrase = ""
    for m in _BOX.finditer(text):
        lead = text[prev_end : m.start()].strip(_SEPARATORS)
        if lead:
            phrase = lead.splitlines()[-1].strip(_SEPARATORS)
        prev_end = m.end()
        shown = _shown(m.group(0))
        try:
            vals = tuple(float(g) for g in m.groups())
        except ValueError:  # pragma: no cover - the regex admits only numbers
            problems.append(f"unreadable box {shown!r}")
            continue
        if not all(math.isfinite(v) for v in vals):  # float("9" * 400) is inf, which JSON cannot hold
            problems.append(f"box {shown} has a coordinate too large for a float; dropped")
            continue
        x0, y0, x1, y1 = vals
        if x1 < x0 or y1 < y0:
            problems.append(f"box {shown} has x1 < x0 or y1 < y0; dropped")
            continue
        if units == "bins" and not all(0 <= v <= BINS - 1 for v in vals):
            problems.append(f"box {shown} has values outside 0..{BINS - 1}; dropped")
            continue
        if units == "pixels" and size is not None:
            h, w = size
            if not (x0 >= -1 and y0 >= -1 and x1 <= w + 1 and y1 <= h + 1):
                problems.append(f"box {shown} leaves the {w}x{h} image; dropped")
                continue
        boxes.append(TextBox(phrase, vals, (m.start(), m.end())))  # type: ignore[arg-type]
    if re.search(r"\[\s*-?\d", text[prev_end:]):
        problems.append("text ends in an incomplete [x0, y0, x1, y1] box")
    return CoordAnswer(tuple(boxes), tuple(problems))


def render_json(boxes: Sequence[TextBox]) -> str:
    """Qwen2.5-VL's answer: a JSON list of ``{"bbox_2d": [...], "label": ...}`` in a json fence."""
    items = [{"bbox_2d": [int(v) if float(v).is_integer() else v for v in b.box], "label": b.phrase} for b in boxes]
    return "```json\n" + json.dumps(items, indent=2) + "\n```"


_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
_OBJECT = re.compile(r"\{[^{}]*\}")
_JSON_SYNTAX = re.compile(r'["\\\[\]{}]')  # what changes the nesting depth, or whether we are in a string


class _TooDeep(ValueError):
    """JSON nested deeper than ``MAX_JSON_DEPTH``."""


def _too_deep(body: str) -> bool:
    """Whether ``body`` nests brackets deeper than ``MAX_JSON_DEPTH``, strings aside; one pass, no recursion."""
    if body.count("[") + body.count("{") <= MAX_JSON_DEPTH:  # most answers: no need to walk the text
        return False
    depth = 0
    in_string = False
    escaped_at = -1  # position of the character a backslash escapes
    for m in _JSON_SYNTAX.finditer(body):
        c, at = m.group(0), m.start()
        if in_string:
            if at == escaped_at:
                continue
            if c == "\\":
                escaped_at = at + 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif c in "]}":
            depth = max(depth - 1, 0)  # a stray closing bracket must not hide the depth of what follows
    return False


def _json_int(digits: str) -> int | float:
    """JSON integers as ``int``, but as a float (``inf``) when they are longer than any float: ``int()`` refuses
    more than 4,300 digits."""
    return int(digits) if len(digits) <= 400 else float(digits)


_DECODER = json.JSONDecoder(parse_int=_json_int)  # one for all: json.loads with an option builds one per call


def _loads(body: str) -> object:
    """``json.loads`` that raises only ValueError (JSONDecodeError among them), however deep or long ``body`` is."""
    if _too_deep(body):
        raise _TooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return _DECODER.decode(body)
    except RecursionError:  # pragma: no cover - _too_deep stops these first
        raise _TooDeep(f"nested deeper than {MAX_JSON_DEPTH} levels") from None


def parse_json(text: str) -> CoordAnswer:
    """Read a Qwen2.5-VL JSON answer; a truncated list keeps its complete objects and says so."""
    if not isinstance(text, str):
        return CoordAnswer(problems=(f"expected text, got {type(text).__name__}",))
    problems: list[str] = []
    fence = _FENCE.search(text)
    body = fence.group(1) if fence else text
    try:
        data = _loads(body)
        items = data if isinstance(data, list) else [data]
    except ValueError as e:
        items = []
        for m in _OBJECT.finditer(body):
            try:
                items.append(_loads(m.group(0)))
            except ValueError:
                problems.append(f"unreadable object {m.group(0)[:60]!r}")
        why = "nested too deep" if isinstance(e, _TooDeep) else "not valid JSON"
        problems.append(f"answer is {why}; read {len(items)} complete objects")
    boxes: list[TextBox] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            problems.append(f"item {i} is not an object")
            continue
        raw = item.get("bbox_2d", item.get("bbox"))
        if not isinstance(raw, list) or len(raw) != 4:
            problems.append(f"item {i} has no 4-number bbox_2d")
            continue
        try:
            vals = tuple(float(v) for v in raw)
        except (TypeError, ValueError):
            problems.append(f"item {i} has a non-numeric bbox_2d {_shown(repr(raw))}")
            continue
        except OverflowError:  # float() of an int past the float range
            problems.append(f"item {i} has a bbox_2d coordinate too large for a float {_shown(repr(raw))}")
            continue
        if not all(math.isfinite(v) for v in vals):
            problems.append(f"item {i} has a non-finite bbox_2d {_shown(repr(raw))}")
            continue
        if vals[2] < vals[0] or vals[3] < vals[1]:
            problems.append(f"item {i} has x1 < x0 or y1 < y0; dropped")
            continue
        label = item.get("label", "")
        boxes.append(TextBox(label if isinstance(label, str) else str(label), vals))  # type: ignore[arg-type]
    return CoordAnswer(tuple(boxes), tuple(problems))
