"""Readers for public annotation formats: COCO instances and panoptic, HumanRef JSONL, RefCOCO refs,
and the world's language JSONL. Malformed input raises ``FormatError`` naming the file, line and field.

Boxes come back as ``[x0, y0, x1, y1]`` pixels (COCO's ``[x, y, w, h]`` is converted).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class FormatError(ValueError):
    pass


def load_json(path: str | Path) -> object:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{p}: not valid JSON (line {e.lineno}: {e.msg})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; ``FormatError`` names the line that is not a JSON object."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    with open(p) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise FormatError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def check_box(box: object, where: str) -> list[float]:
    """A finite ``[x0, y0, x1, y1]`` with x1 >= x0 and y1 >= y0, or ``FormatError``."""
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise FormatError(f"{where}: expected [x0, y0, x1, y1], got {box!r}")
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise FormatError(f"{where}: non-numeric box {box!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise FormatError(f"{where}: non-finite box {box!r}")
    if vals[2] < vals[0] or vals[3] < vals[1]:
        raise FormatError(f"{where}: box has x1 < x0 or y1 < y0: {box!r}")
    return vals


def _require(rec: dict, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in rec:
        raise FormatError(f"{where}: missing field {key!r}")
    if not isinstance(rec[key], types):
        raise FormatError(
            f"{where}: field {key!r} should be {getattr(types, '__name__', types)}, got {type(rec[key]).__name__}"
        )
    return rec[key]


def _boxes(rec: dict, key: str, where: str) -> list[list[float]]:
    return [check_box(b, f"{where}: {key}[{i}]") for i, b in enumerate(_require(rec, key, list, where))]


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------


def load_coco(path: str | Path):
    """A ``pycocotools.coco.COCO`` over an instances file, after checking its structure."""
    from pycocotools.coco import COCO

    data = load_json(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        _require(data, key, list, str(path))
    image_ids = {img.get("id") for img in data["images"]}
    cat_ids = {c.get("id") for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        if ann.get("image_id") not in image_ids:
            raise FormatError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in cat_ids:
            raise FormatError(f"{where}: unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise FormatError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
        check_box([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], f"{where}: bbox")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; stdout may carry JSON
        coco.createIndex()
    return coco


def coco_box(ann: dict) -> list[float]:
    x, y, w, h = ann["bbox"]
    return [x, y, x + w, y + h]


# ---------------------------------------------------------------------------------------------
# HumanRef
# ---------------------------------------------------------------------------------------------


@dataclass
class HumanRefSample:
    id: str
    image_name: str
    referring: str
    candidate_boxes: list[list[float]]
    answer_boxes: list[list[float]]
    domain: str
    sub_domain: str = ""
    answer_segmentations: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def is_rejection(self) -> bool:
        return self.domain == "rejection" or not self.answer_boxes


def read_humanref(path: str | Path) -> list[HumanRefSample]:
    samples = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        sample = HumanRefSample(
            id=str(_require(rec, "id", (str, int), where)),
            image_name=str(_require(rec, "image_name", str, where)),
            referring=str(_require(rec, "referring", str, where)),
            candidate_boxes=_boxes(rec, "candidate_boxes", where),
            answer_boxes=_boxes(rec, "answer_boxes", where),
            domain=str(_require(rec, "domain", str, where)),
            sub_domain=str(rec.get("sub_domain", "")),
            answer_segmentations=list(rec.get("answer_segmentations") or []),
            extra={
                k: v
                for k, v in rec.items()
                if k
                not in {
                    "id",
                    "image_name",
                    "referring",
                    "candidate_boxes",
                    "answer_boxes",
                    "domain",
                    "sub_domain",
                    "answer_segmentations",
                }
            },
        )
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------------------------
# RefCOCO refs, panoptic, language
# ---------------------------------------------------------------------------------------------


def read_refs(path: str | Path) -> list[dict]:
    """RefCOCO-style refs as JSON (the original ``refs(unc).p`` pickles are never unpickled here)."""
    p = Path(path)
    if p.suffix in (".p", ".pkl", ".pickle"):
        raise FormatError(f"{p}: pickled refs are not loaded (unpickling runs code); convert them to JSON first")
    data = load_json(p)
    if not isinstance(data, list):
        raise FormatError(f"{p}: expected a JSON list of refs")
    for i, ref in enumerate(data):
        where = f"{p}: refs[{i}]"
        if not isinstance(ref, dict):
            raise FormatError(f"{where}: expected an object")
        for key, types in (("ref_id", int), ("ann_id", int), ("image_id", int), ("sentences", list)):
            _require(ref, key, types, where)
    return data


def read_panoptic(json_path: str | Path, png_dir: str | Path) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield ``(annotation, segment id map)`` per image of a COCO panoptic set."""
    data = load_json(json_path)
    if not isinstance(data, dict):
        raise FormatError(f"{json_path}: expected a JSON object")
    for i, ann in enumerate(_require(data, "annotations", list, str(json_path))):
        where = f"{json_path}: annotations[{i}]"
        name = _require(ann, "file_name", str, where)
        png = Path(png_dir) / str(name)
        if not png.is_file():
            raise FileNotFoundError(f"{where}: panoptic PNG {png} is missing")
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
        yield ann, rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def read_language(path: str | Path) -> list[dict]:
    records = []
    for lineno, rec in iter_jsonl(path):
        _require(rec, "type", str, f"{path}:{lineno}")
        records.append(rec)
    return records
