"""Reading prediction files for ``perceive eval``. Every bad record is named by file, line (or list
index) and field. With ``strict`` the first one raises ``FormatError``; otherwise it is skipped and
counted, and the report says how many were skipped and why."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceive.data.readers import FormatError


@dataclass
class Problems:
    strict: bool = False
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def report(self, where: str, reason: str) -> None:
        message = f"{where}: {reason}"
        if self.strict:
            raise FormatError(message)
        self.skipped += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def to_json(self) -> dict:
        return {"skipped": self.skipped, "reasons": dict(self.reasons), "examples": self.examples}


def _records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) from a JSON list or a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    text = p.read_text()
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None
        for i, rec in enumerate(data):
            yield f"{p}[{i}]", rec
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{p}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{p}:{lineno}", FormatError(f"not valid JSON ({e.msg})")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def box_problem(box: Any, fmt: str) -> str | None:
    """Why a box is unusable, or None. ``fmt`` is "xyxy" or "xywh"."""
    if not isinstance(box, list) or len(box) != 4:
        return f"expected 4 numbers, got {box!r}"
    if not all(_number(v) for v in box):
        return f"non-numeric or non-finite value in {box!r}"
    if fmt == "xyxy" and (box[2] < box[0] or box[3] < box[1]):
        return f"x1 < x0 or y1 < y0 in {box!r}"
    if fmt == "xywh" and (box[2] < 0 or box[3] < 0):
        return f"negative width or height in {box!r}"
    return None


Check = Callable[[dict, str], str | None]


def load_records(
    path: str | Path, required: dict[str, type | tuple[type, ...]], problems: Problems, checks: tuple[Check, ...] = ()
) -> list[dict]:
    """Records having ``required`` fields of the given types and passing every check."""
    out = []
    for where, rec in _records(path):
        if isinstance(rec, FormatError):
            problems.report(where, str(rec))
            continue
        if not isinstance(rec, dict):
            problems.report(where, f"expected an object, got {type(rec).__name__}")
            continue
        bad = next((k for k in required if k not in rec), None)
        if bad is not None:
            problems.report(where, f"missing field '{bad}'")
            continue
        wrong = next((k for k, t in required.items() if not isinstance(rec[k], t) or isinstance(rec[k], bool)), None)
        if wrong is not None:
            problems.report(where, f"field '{wrong}' has the wrong type ({type(rec[wrong]).__name__})")
            continue
        reason = next((r for r in (c(rec, where) for c in checks) if r), None)
        if reason:
            problems.report(where, reason)
            continue
        out.append(rec)
    return out


def load_coco_results(
    path: str | Path, gt: Any, problems: Problems, need_score: bool = True, iou_type: str = "bbox"
) -> list[dict]:
    """COCO results checked against the ground truth's image and category ids."""
    images, cats = set(gt.getImgIds()), set(gt.getCatIds())

    def known(rec: dict, where: str) -> str | None:
        if rec["image_id"] not in images:
            return f"field 'image_id': unknown id {rec['image_id']!r}"
        if rec["category_id"] not in cats:
            return f"field 'category_id': unknown id {rec['category_id']!r}"
        if iou_type == "bbox":
            why = box_problem(rec.get("bbox"), "xywh")
            return f"field 'bbox': {why}" if why else None
        return None if isinstance(rec.get("segmentation"), dict) else "field 'segmentation': expected an RLE object"

    def scored(rec: dict, where: str) -> str | None:
        if not need_score:
            return None
        return (
            None if _number(rec.get("score")) else f"field 'score': expected a finite number, got {rec.get('score')!r}"
        )

    return load_records(path, {"image_id": int, "category_id": int}, problems, (known, scored))


def load_humanref_predictions(path: str | Path, ids: set[str], problems: Problems) -> dict[str, list[list[float]]]:
    """HumanRef predictions: ``{"id", "extracted_predictions": [[x0, y0, x1, y1] or [x, y], ...]}``."""

    def check(rec: dict, where: str) -> str | None:
        if str(rec["id"]) not in ids:
            return f"field 'id': unknown id {rec['id']!r}"
        for i, p in enumerate(rec["extracted_predictions"]):
            if isinstance(p, list) and len(p) == 0:
                continue  # the reference format writes [[]] for "nothing"
            if isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p):
                continue
            why = box_problem(p, "xyxy")
            if why:
                return f"field 'extracted_predictions[{i}]': {why}"
        return None

    recs = load_records(path, {"id": (str, int), "extracted_predictions": list}, problems, (check,))
    return {str(r["id"]): [p for p in r["extracted_predictions"] if p] for r in recs}
