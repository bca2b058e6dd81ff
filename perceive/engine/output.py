"""What the data engine writes from its results (``results.jsonl``, one item a line), each file whole again after
every run, so that a resumed run never repeats a record:

- ``annotations.jsonl``: perceive's own JSONL (``perceive.data.sources.jsonl``) with every kept region's box,
  category, four region texts and referring expression, and the grounded caption; ``spec.json`` lists it, so
  ``perceive train --data OUT/spec.json`` trains on it. The engine labels what its caption mentions, not every
  object of a category, so the spec says ``exhaustive: false`` (nothing is taught absent, nothing counted).
- ``instances.json``: COCO instances (categories: the region category captions), with each box's ``score``.
- ``referring.jsonl``: HumanRef-style lines (``domain`` "engine"), one per referring expression, an image's kept
  boxes its candidates.
- ``summary.json``: what each stage kept and dropped, the errors, and seconds per image per stage.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from perceive.engine.phrases import head_noun
from perceive.engine.stages import DROP_RULES


def _write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all: a kill mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def kept_regions(item: dict) -> list[dict]:
    return [r for r in item.get("regions", []) if r.get("dropped") is None]


def label(region: dict) -> str:
    """A region's category: its category caption, else its phrase's head noun."""
    return (region.get("category") or "").strip() or head_noun(region["phrase"]) or region["phrase"]


def region_texts(region: dict) -> dict:
    """The four texts of a region; a referring sentence that failed its check describes no region uniquely, so
    it is left out."""
    texts = {f: region.get(f, "") for f in ("category", "short_phrase", "brief", "referring")}
    if not region.get("expression"):
        texts["referring"] = ""
    return texts


def annotation_line(item: dict, out: Path) -> dict:
    regions = kept_regions(item)
    line: dict = {
        "image": os.path.relpath(Path(item["image"]).resolve(), out.resolve()),
        "width": item["width"],
        "height": item["height"],
        "boxes": [r["box"] for r in regions],
        "labels": [label(r) for r in regions],
        "scores": [r["score"] for r in regions],
        "regions": [region_texts(r) for r in regions],
        "expressions": [{"text": r["expression"], "boxes": [k]} for k, r in enumerate(regions) if r.get("expression")],
    }
    phrases = []
    for p in item.get("phrases", []):
        boxes = [k for k, r in enumerate(regions) if r["phrase"] == p["text"]]
        if boxes:
            phrases.append({"span": p["span"], "boxes": boxes})
    if item.get("caption"):
        line["captions"] = [{"kind": item.get("caption_kind", "caption_brief"), "text": item["caption"],
                             "phrases": phrases}]  # fmt: skip
    return line


def summarize(items: list[dict]) -> dict:
    """Counts of what each stage kept and dropped, the errors by stage, and mean seconds per image per stage."""
    errors = Counter(it["error"].split(":", 1)[0] for it in items if "error" in it)
    done = [it for it in items if "error" not in it]
    phrases = sum(len(it.get("phrases", [])) for it in done)
    dropped_phrases = Counter(p["rule"] for it in done for p in it.get("dropped_phrases", []))
    regions = [r for it in done for r in it.get("regions", [])]
    dropped = Counter(r["dropped"] for r in regions if r["dropped"] is not None)
    expressions_dropped = Counter(r["expression_dropped"] for r in regions if r.get("expression_dropped"))
    seconds: dict[str, list[float]] = {}
    for it in items:
        for stage, s in it.get("seconds", {}).items():
            seconds.setdefault(stage, []).append(s)
    return {
        "images": len(items),
        "annotated": len(done),
        "errors": dict(errors),
        "phrases": {"kept": phrases, "dropped": dict(dropped_phrases)},
        "regions": {
            "grounded": len(regions),
            "dropped": {rule: dropped.get(rule, 0) for rule in DROP_RULES},
            "kept": len(regions) - sum(dropped.values()),
        },
        "expressions": sum(1 for r in regions if r["dropped"] is None and r.get("expression")),
        "expressions_dropped": dict(expressions_dropped),
        "seconds_per_image": {stage: round(sum(v) / len(v), 4) for stage, v in seconds.items()},
    }


def write_outputs(items: list[dict], out: Path) -> dict:
    """Every output file of ``out`` from the results ``items`` (in input order); returns the summary."""
    done = [it for it in items if "error" not in it]
    lines = [annotation_line(it, out) for it in done]
    _write(out / "annotations.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    categories = sorted({lab for line in lines for lab in line["labels"]})
    cat_id = {c: k + 1 for k, c in enumerate(categories)}
    coco: dict = {"images": [], "annotations": [], "categories": [{"id": cat_id[c], "name": c} for c in categories]}
    referring: list[dict] = []
    for image_id, line in enumerate(lines, start=1):
        coco["images"].append({"id": image_id, "file_name": line["image"], "width": line["width"],
                               "height": line["height"]})  # fmt: skip
        for box, lab, score in zip(line["boxes"], line["labels"], line["scores"], strict=True):
            x0, y0, x1, y1 = box
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": cat_id[lab], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                        "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "score": score})  # fmt: skip
        for e in line["expressions"]:
            referring.append({"id": f"{image_id}-{len(referring)}", "image_name": line["image"],
                              "width": line["width"], "height": line["height"], "referring": e["text"],
                              "candidate_boxes": line["boxes"], "answer_boxes": [line["boxes"][k] for k in e["boxes"]],
                              "domain": "engine"})  # fmt: skip
    _write(out / "instances.json", json.dumps(coco))
    _write(out / "referring.jsonl", "".join(json.dumps(r) + "\n" for r in referring))
    spec = {"sources": [{"format": "jsonl", "annotations": "annotations.jsonl", "exhaustive": False}]}
    _write(out / "spec.json", json.dumps(spec, indent=1) + "\n")
    summary = summarize(items)
    _write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return summary
