"""COCO panoptic as a source of records (``format: "panoptic"``): the ``annotations`` JSON, the ``masks`` folder of
segment-id PNGs (id = R + 256 G + 256^2 B) and the ``images`` folder.

Every segment becomes an instance whose id is its segment id, its box the segment's ``bbox`` and its mask the
segment's pixels as compressed RLE, computed from the PNG when ``record(i)`` is asked for (not at load time).
Thing segments are ordinary instances (``iscrowd`` as the file says). Stuff segments (sky, grass: a category
with ``isthing: 0``) are kept for the segmentation tasks that read masks, but marked so that no task takes them
for objects: ``iscrowd=True`` (never a box the model is given, never a detection target, never counted, never
named absent) and ``attributes={"stuff": "yes"}`` (what tells them from a crowd of things; the schema does not
list it, so no head learns it). The schema's categories are the thing categories, in id order.

Things are labelled exhaustively, as in COCO: ``negative_categories`` are every thing category but those of a
segment skipped on that image, and a count question is asked per thing category present without a crowd.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from perceive.boxes import mask_to_rle
from perceive.data.readers import FormatError
from perceive.data.records import AttributeSchema, ImageRecord, Instance, RegionText
from perceive.data.sources import (
    PackedRows,
    Skipped,
    Source,
    clip_box,
    coco_categories,
    count_questions,
    finite_numbers,
    load_json_file,
    skip,
)

PANOPTIC_EXPECTED = "a COCO panoptic JSON (an object with images, categories and annotations with segments_info)"


class PanopticSource(Source):
    """The images of a COCO panoptic set that have a panoptic annotation, one record each."""

    name = "panoptic"
    kinds: tuple[str, ...] | None = None

    def __init__(self, annotations: str | Path, masks: str | Path, images: str | Path, strict: bool = False) -> None:
        self.path = Path(annotations)
        self.masks = Path(masks)
        self.images = Path(images)
        self.strict = strict
        self.skipped = Skipped()
        data = load_json_file(self.path, PANOPTIC_EXPECTED)
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise FormatError(f"{self.path}: not {PANOPTIC_EXPECTED}")
        first = next((a for a in data["annotations"] if isinstance(a, dict)), {})
        if first and "segments_info" not in first:
            what = " (it is COCO instances: use format 'coco')" if "bbox" in first else ""
            raise FormatError(f"{self.path}: not {PANOPTIC_EXPECTED}{what}")
        categories = self._read_categories(data["categories"])
        self.things = [name for _, (name, thing) in sorted(categories.items()) if thing]
        self.things = list(dict.fromkeys(self.things))
        self.schema = AttributeSchema({"category": self.things})
        files = self._read_images(data["images"])
        self._rows = PackedRows(self._read_annotations(data["annotations"], files, categories))

    def _skip(self, reason: str, where: str) -> None:
        skip(self.skipped, self.strict, reason, where)

    def _read_categories(self, categories: list) -> dict[int, tuple[str, bool]]:
        found = coco_categories(categories, str(self.path), self._skip)
        return {cid: (name, bool(entry.get("isthing", 1))) for cid, (name, entry) in found.items()}

    def _read_images(self, images: list) -> dict:
        """Image id -> ``(file, width, height)``, or None for an image skipped (missing, malformed)."""
        out: dict = {}
        for k, image in enumerate(images):
            image_id = image.get("id") if isinstance(image, dict) else None
            where = f"{self.path}: images[{k}] (id {image_id!r})"
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or image_id in out:
                self._skip("malformed image entry", where)
                continue
            name, width, height = image.get("file_name"), image.get("width"), image.get("height")
            if (
                not isinstance(name, str)
                or not (isinstance(width, int) and isinstance(height, int))
                or min(width, height) <= 0
            ):
                self._skip("malformed image entry", where)
                out[image_id] = None
                continue
            file = self.images / name
            if not file.is_file():
                self._skip("missing image", f"{where}: {file}")
                out[image_id] = None
                continue
            out[image_id] = (str(file), width, height)
        return out

    def _read_annotations(self, annotations: list, images: dict, categories: dict) -> list[list]:
        """A row ``[image id, file, width, height, png, segments, unsure]`` per usable annotation; each segment
        ``[id, box, category, iscrowd, isthing]``; ``unsure``: the categories of segments skipped."""
        rows = []
        for k, ann in enumerate(annotations):
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            where = f"{self.path}: annotations[{k}] (image_id {image_id!r})"
            if not isinstance(ann, dict) or not isinstance(ann.get("segments_info"), list):
                self._skip("malformed annotation", where)
                continue
            if not isinstance(image_id, (int, str)) or image_id not in images:
                self._skip("unknown image", where)
                continue
            if images[image_id] is None:
                continue  # its image is counted already
            png = self.masks / str(ann.get("file_name"))
            if not isinstance(ann.get("file_name"), str) or not png.is_file():
                self._skip("missing panoptic PNG", f"{where}: {png}")
                continue
            file, width, height = images[image_id]
            segments, unsure, seen = [], [], set()
            for j, seg in enumerate(ann["segments_info"]):
                sid = seg.get("id") if isinstance(seg, dict) else None
                cid = seg.get("category_id") if isinstance(seg, dict) else None
                at = f"{where}: segments_info[{j}] (id {sid!r})"
                if not isinstance(cid, int) or cid not in categories:
                    self._skip("unknown category", at)
                    continue
                name, thing = categories[cid]
                bbox = finite_numbers(seg.get("bbox"), 4)
                if not isinstance(sid, int) or sid in seen or bbox is None:
                    unsure.append(name)
                    self._skip("malformed segment", at)
                    continue
                box, why = clip_box([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], width, height)
                if box is None:
                    unsure.append(name)
                    self._skip(why, f"{at}: bbox {seg.get('bbox')!r} in a {width}x{height} image")
                    continue
                seen.add(sid)
                segments.append([sid, box, name, int(bool(seg.get("iscrowd", 0))), int(thing)])
            rows.append([image_id, file, width, height, str(png), segments, unsure])
        return rows

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> ImageRecord:
        image_id, file, width, height, png, segments, unsure = self._rows[index]
        rgb = np.asarray(Image.open(png, formats=["PNG"]).convert("RGB"), dtype=np.int64)
        if rgb.shape[:2] != (height, width):
            raise FormatError(f"{png}: {rgb.shape[1]}x{rgb.shape[0]}, but its image is {width}x{height}")
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        instances = []
        for sid, box, category, crowd, thing in segments:
            pixels = ids == sid
            instances.append(Instance(sid, box, category, mask=mask_to_rle(pixels) if pixels.any() else None,
                                      attributes={} if thing else {"stuff": "yes"},
                                      iscrowd=bool(crowd) or not thing))  # fmt: skip
        record = ImageRecord(str(image_id), width, height, Path(file), instances=instances)
        uncountable = {i.category for i in instances if i.iscrowd} | set(unsure)
        record.questions = count_questions(
            dataclasses.replace(record, instances=[i for i in instances if i.category not in uncountable])
        )
        record.regions = [RegionText(i.id, category=i.category) for i in instances if not i.iscrowd]
        record.negative_categories = [c for c in self.things if c not in set(unsure)]
        return record
