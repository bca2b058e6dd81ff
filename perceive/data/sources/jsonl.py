"""Your own labelled images as a source of records (``format: "jsonl"``): a JSON Lines file, one image a line.

    {"image": "photos/0001.jpg",
     "boxes": [[x0, y0, x1, y1], ...],
     "labels": ["dog", "person", ...],
     "masks": [mask or null, ...],
     "expressions": [{"text": "the dog on the left", "boxes": [0]}, ...],
     "width": 640, "height": 480}

- ``image``: the image's path, relative to the source's ``images`` folder (by default the JSONL file's folder).
- ``boxes``: pixel boxes ``[x0, y0, x1, y1]`` of the image as a viewer shows it (EXIF orientation applied); a box
  that overlaps the image is clipped to it, one wholly outside it or with x1 < x0 is skipped (and counted).
- ``labels``: each box's category, a non-empty string; as many as ``boxes``. An image with no boxes (``[]`` and
  ``[]``) is an image in which none of the file's categories is.
- ``masks`` (optional): each box's mask, COCO RLE (``{"size": [height, width], "counts": ...}``, compressed or
  not) or polygons (``[[x, y, x, y, ...], ...]``), or null; as many as ``boxes``.
- ``expressions`` (optional): referring expressions, each answered by the boxes it names (indices into
  ``boxes``); no ``boxes`` or ``[]``: the expression selects nothing in the image (a rejection).
- ``width``, ``height`` (optional): the image's size; read from the image's header at load time when absent.
- ``regions`` (optional): each box's texts at ChatRex's four granularities, ``{"category", "short_phrase",
  "brief", "referring"}`` (any of them; ``referring`` a sentence that selects this box alone), or null; as many
  as ``boxes``. Without it a box's region category is its label.
- ``captions`` (optional): grounded captions of the image, ``{"text": "...", "kind": "caption_brief" or
  "caption_detailed", "phrases": [{"span": [start, end], "boxes": [0, 2]}, ...]}`` (``span``: characters of
  ``text``; ``boxes``: indices into ``boxes``). A phrase naming a skipped box is dropped (and counted).

Records: one per line, instance ``k`` the ``k``-th box (id ``k``). By default a file is taken to label every
object of its categories (like COCO): a record's ``negative_categories`` are every label of the file, and a
count question is asked per category present. With ``exhaustive: false`` in the data spec nothing is taught
absent and nothing is counted. A skipped box's category is neither taught absent nor counted on its image, and
an expression that names a skipped box is skipped with it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from perceive.data.records import (
    AttributeSchema,
    Caption,
    Expression,
    GroundedPhrase,
    ImageRecord,
    Instance,
    RegionText,
)
from perceive.data.sources import (
    PackedRows,
    Skipped,
    Source,
    clip_box,
    count_questions,
    finite_numbers,
    first_line,
    image_size,
    json_lines,
    skip,
    valid_mask,
)
from perceive.images import ImageError

JSONL_EXPECTED = "a JSON Lines file of labelled images (one object a line with image, boxes and labels)"
REGION_TEXTS = ("category", "short_phrase", "brief", "referring")
CAPTION_KINDS = ("caption_brief", "caption_detailed")


class JsonlSource(Source):
    """The lines of an own-data JSONL file, one record each."""

    name = "jsonl"
    kinds: tuple[str, ...] | None = None

    def __init__(
        self, annotations: str | Path, images: str | Path | None = None, exhaustive: bool = True, strict: bool = False
    ) -> None:
        self.path = Path(annotations)
        self.images = Path(images) if images is not None else self.path.parent
        self.exhaustive = exhaustive
        self.strict = strict
        self.skipped = Skipped()
        first_line(self.path, JSONL_EXPECTED, ("image", "boxes", "labels"))
        labels: set[str] = set()
        self._seen: set[str] = set()  # the images of the lines read
        rows = []
        for where, line in json_lines(self.path, self._skip):
            row = self._read_line(line, where)
            if row is not None:
                rows.append(row)
                labels.update(inst[2] for inst in row[4])
        self.categories = sorted(labels)
        self.schema = AttributeSchema({"category": self.categories})
        self._rows = PackedRows(rows)
        del self._seen

    def _skip(self, reason: str, where: str) -> None:
        skip(self.skipped, self.strict, reason, where)

    def _read_line(self, line: Any, where: str) -> list | None:
        """Row ``[key, file, width, height, [[box, label, mask], ...], expressions, unsure, regions, captions]`` of
        line ``where`` (its JSON value)."""
        if not isinstance(line, dict) or not isinstance(line.get("image"), str) or not line["image"]:
            self._skip("malformed line", f"{where}: no image")
            return None
        boxes, labels = line.get("boxes"), line.get("labels")
        masks, expressions = line.get("masks"), line.get("expressions", [])
        if not isinstance(boxes, list) or not isinstance(labels, list):
            self._skip("malformed line", f"{where}: boxes and labels must be lists")
            return None
        if boxes and not labels:
            self._skip("empty category list", where)
            return None
        if len(labels) != len(boxes) or (
            masks is not None and (not isinstance(masks, list) or len(masks) != len(boxes))
        ):
            self._skip("malformed line", f"{where}: boxes, labels and masks must be lists of one length")
            return None
        if not all(isinstance(label, str) and label.strip() for label in labels):
            self._skip("malformed line", f"{where}: a label that is not a non-empty string")
            return None
        if not isinstance(expressions, list) or not all(
            isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()
            and isinstance(e.get("boxes", []), list) for e in expressions
        ):  # fmt: skip
            self._skip("malformed line", f"{where}: expressions must be objects with a text and a list of boxes")
            return None
        regions = line.get("regions")
        if regions is not None and (not isinstance(regions, list) or len(regions) != len(boxes) or not all(
            r is None or (isinstance(r, dict) and all(isinstance(r.get(f, ""), str) for f in REGION_TEXTS))
            for r in regions
        )):  # fmt: skip
            self._skip("malformed line", f"{where}: regions must be a list of text objects or null, one per box")
            return None
        captions = line.get("captions", [])
        if not isinstance(captions, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"].strip()
            and c.get("kind", "caption_brief") in CAPTION_KINDS and isinstance(c.get("phrases", []), list)
            for c in captions
        ):  # fmt: skip
            self._skip("malformed line", f"{where}: captions must be objects with a text, a kind of "
                                         f"{' or '.join(CAPTION_KINDS)} and a list of phrases")  # fmt: skip
            return None
        if line["image"] in self._seen:
            self._skip("duplicate image", f"{where}: {line['image']} (an image's boxes go on one line)")
            return None
        self._seen.add(line["image"])
        file = self.images / line["image"]
        if not file.is_file():
            self._skip("missing image", f"{where}: {file}")
            return None
        width, height = line.get("width"), line.get("height")
        if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
            try:
                width, height = image_size(file)
            except ImageError:
                self._skip("unreadable image", f"{where}: {file}")
                return None
        instances, kept, unsure = [], set(), []
        for k, (value, label) in enumerate(zip(boxes, labels, strict=True)):
            box = finite_numbers(value, 4)
            box, why = clip_box(box, width, height) if box is not None else (None, "malformed box")
            if box is None:
                unsure.append(label.strip())
                self._skip(why, f"{where}: boxes[{k}] {value!r} in a {width}x{height} image")
                continue
            mask = masks[k] if masks is not None else None
            if mask is not None and not valid_mask(mask, width, height):
                self._skip("malformed mask (box kept without it)", f"{where}: masks[{k}]")
                mask = None
            instances.append([k, box, label.strip(), mask])
            kept.add(k)
        texts = []
        for j, e in enumerate(expressions):
            answer = e.get("boxes", [])
            if not all(isinstance(k, int) and 0 <= k < len(boxes) for k in answer):
                self._skip("expression naming no box of its line", f"{where}: expressions[{j}]")
            elif not all(k in kept for k in answer):
                self._skip("expression naming a skipped box", f"{where}: expressions[{j}]")
            else:
                texts.append([e["text"].strip(), sorted(set(answer))])
        region_rows = [[k, *(regions[k].get(f, "").strip() for f in REGION_TEXTS)]
                       for k in sorted(kept) if regions is not None and regions[k] is not None]  # fmt: skip
        caption_rows = [self._caption(c, kept, f"{where}: captions[{j}]") for j, c in enumerate(captions)]
        return [line["image"], str(file), width, height, instances, texts, unsure, region_rows, caption_rows]

    def _caption(self, caption: dict, kept: set[int], where: str) -> list:
        """Row ``[kind, text, [[start, end, boxes], ...]]``; a phrase with a bad span or box is skipped."""
        text = caption["text"]
        phrases = []
        for j, p in enumerate(caption.get("phrases", [])):
            span = p.get("span") if isinstance(p, dict) else None
            boxes = p.get("boxes", []) if isinstance(p, dict) else None
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                    and 0 <= span[0] < span[1] <= len(text)) or not isinstance(boxes, list):  # fmt: skip
                self._skip("malformed caption phrase", f"{where}.phrases[{j}]")
            elif not all(isinstance(k, int) and k in kept for k in boxes):
                self._skip("caption phrase naming a missing or skipped box", f"{where}.phrases[{j}]")
            else:
                phrases.append([span[0], span[1], sorted(set(boxes))])
        return [caption.get("kind", "caption_brief"), text, phrases]

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> ImageRecord:
        key, file, width, height, boxes, expressions, unsure, region_rows, caption_rows = self._rows[index]
        instances = [Instance(k, box, label, mask=mask) for k, box, label, mask in boxes]
        texts = {row[0]: dict(zip(REGION_TEXTS, row[1:], strict=True)) for row in region_rows}
        regions = [RegionText(i.id, **{**texts.get(i.id, {}), "category": texts.get(i.id, {}).get("category")
                                       or i.category}) for i in instances]  # fmt: skip
        captions = [Caption(kind, text, [GroundedPhrase(text[a:b], (a, b), ks) for a, b, ks in phrases])
                    for kind, text, phrases in caption_rows]  # fmt: skip
        record = ImageRecord(key, width, height, Path(file), instances=instances,
                             expressions=[Expression(text, answer) for text, answer in expressions],
                             captions=captions, regions=regions)  # fmt: skip
        if self.exhaustive:
            unsure = set(unsure)
            countable = [i for i in instances if i.category not in unsure]
            record.questions = count_questions(dataclasses.replace(record, instances=countable))
            record.negative_categories = [c for c in self.categories if c not in unsure]
        return record
