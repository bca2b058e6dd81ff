"""HumanRef's JSONL as a source of records (``format: "humanref"``): one referring expression a line, ``{"id",
"image_name", "referring", "candidate_boxes", "answer_boxes", "domain", "sub_domain"?, "answer_segmentations"?}``
with boxes ``[x0, y0, x1, y1]``, and the ``images`` folder that ``image_name`` is in.

A record is an image: its instances are the candidate boxes of its lines (category "person", ids in order of
first appearance; a box repeated on several lines is one instance), each line an ``Expression`` with the
line's domain and sub-domain, answered by the candidates its answer boxes are (the same box, or IoU > 0.99):
several, one, or none (a rejection). A line whose answer is not among its candidates is skipped and counted, as
is one with a box wholly outside its image (a box that overlaps it is clipped to it). An answer's segmentation
becomes its instance's mask. The records ask nothing but referring: no counting, no absent categories.

An image's size is the line's ``width`` and ``height`` where it has them, else read from the image's header
at load time (once per image; an unreadable image is skipped and counted then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceive.boxes import pair_iou
from perceive.data.records import AttributeSchema, Expression, ImageRecord, Instance
from perceive.data.sources import (
    PackedRows,
    Skipped,
    Source,
    clip_box,
    finite_numbers,
    first_line,
    image_size,
    json_lines,
    skip,
    valid_mask,
)
from perceive.images import ImageError

HUMANREF_EXPECTED = ("HumanRef JSONL (one object a line with image_name, referring, candidate_boxes, answer_boxes "
                     "and domain)")  # fmt: skip
SAME_BOX_IOU = 0.99  # an answer box this close to a candidate is that candidate


class HumanRefSource(Source):
    """The images of a HumanRef JSONL file, one record each."""

    name = "humanref"

    def __init__(self, annotations: str | Path, images: str | Path, strict: bool = False) -> None:
        self.path = Path(annotations)
        self.images = Path(images)
        self.strict = strict
        self.skipped = Skipped()
        self.schema = AttributeSchema({"category": ["person"]})
        first_line(self.path, HUMANREF_EXPECTED, ("referring", "candidate_boxes", "answer_boxes"))
        self._by_image: dict[str, list | None] = {}  # image name -> row, None for an image skipped
        kinds: dict[str, None] = {}
        for where, line in json_lines(self.path, self._skip):
            kind = self._read_line(line, where)
            if kind is not None:
                kinds.setdefault(kind)
        self.kinds: tuple[str, ...] | None = tuple(kinds)  # "domain/sub_domain" of the expressions read
        self._rows = PackedRows(row for row in self._by_image.values() if row is not None and row[5])
        del self._by_image

    def _skip(self, reason: str, where: str) -> None:
        skip(self.skipped, self.strict, reason, where)

    def _image(self, name: str, line: dict, where: str) -> list | None:
        """The row ``[name, file, width, height, candidates, expressions, masks]`` of image ``name``, made on its
        first line; None when the image is skipped (counted once, on that line)."""
        if name in self._by_image:
            return self._by_image[name]
        file = self.images / name
        row: list | None = None
        if not file.is_file():
            self._skip("missing image", f"{where}: {file}")
        else:
            width, height = line.get("width"), line.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                try:
                    width, height = image_size(file)
                except ImageError:
                    self._skip("unreadable image", f"{where}: {file}")
                    width = None
            if width is not None:
                row = [name, str(file), width, height, [], [], {}]
        self._by_image[name] = row
        return row

    def _read_line(self, line: Any, where: str) -> str | None:
        """Line ``where`` (its JSON value) into its image's row; its expression's kind, None when skipped."""
        fields = {"image_name": str, "referring": str, "candidate_boxes": list, "answer_boxes": list, "domain": str}
        wrong = [k for k, t in fields.items() if not isinstance(line, dict) or not isinstance(line.get(k), t)]
        if wrong or not line["referring"].strip() or not isinstance(line.get("sub_domain", ""), str):
            self._skip("malformed line", f"{where}: {', '.join(wrong) or 'referring'} missing or of the wrong type")
            return None
        row = self._image(line["image_name"], line, where)
        if row is None:
            return None
        _, _, width, height, instances, expressions, masks = row
        originals = [finite_numbers(b, 4) for b in line["candidate_boxes"] + line["answer_boxes"]]
        if any(b is None for b in originals):
            self._skip("malformed line", f"{where}: a box that is not [x0, y0, x1, y1]")
            return None
        candidates = originals[: len(line["candidate_boxes"])]
        clipped = []
        for box in candidates:
            kept, why = clip_box(box, width, height)  # type: ignore[arg-type]
            if kept is None:
                self._skip(why, f"{where}: candidate {box} in a {width}x{height} image")
                return None
            clipped.append(kept)
        answers = []
        for box in originals[len(candidates) :]:
            match = next((k for k, c in enumerate(candidates) if c == box), None)
            if match is None:
                match = next((k for k, c in enumerate(candidates) if pair_iou(c, box) > SAME_BOX_IOU), None)  # type: ignore[arg-type]
            if match is None:
                self._skip("answer not among its candidates", f"{where}: answer {box}")
                return None
            answers.append(match)
        if line["domain"] == "rejection" and answers:
            self._skip("rejection with answers", where)
            return None
        ids = []  # the line's candidates as the image's instances
        for box in clipped:
            if box not in instances:
                instances.append(box)
            ids.append(instances.index(box))
        segmentations = line.get("answer_segmentations")
        if isinstance(segmentations, list) and len(segmentations) == len(answers):
            for k, mask in zip(answers, segmentations, strict=True):
                if valid_mask(mask, width, height):
                    masks.setdefault(str(ids[k]), mask)  # str: the row's JSON keys
        sub_domain = line.get("sub_domain", "")
        expressions.append([line["referring"].strip(), sorted({ids[k] for k in answers}), line["domain"], sub_domain])
        return f"{line['domain']}/{sub_domain}"

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> ImageRecord:
        name, file, width, height, boxes, expressions, masks = self._rows[index]
        instances = [Instance(k, box, "person", mask=masks.get(str(k))) for k, box in enumerate(boxes)]
        return ImageRecord(name, width, height, Path(file), instances=instances,
                           expressions=[Expression(t, a, d, s) for t, a, d, s in expressions])  # fmt: skip
