"""COCO-format annotation files as sources of records: COCO instances and keypoints (``format: "coco"``, also
Objects365 and any other set written in COCO's format) and LVIS (``format: "lvis"``).

From each annotation: ``bbox`` (``[x, y, w, h]``; clipped to the image where it overlaps it), ``category_id``
(ids need not be contiguous: the schema's categories are in id order), ``segmentation`` kept as the file has
it (polygons, compressed or uncompressed RLE) in ``Instance.mask``, ``iscrowd`` (a crowd region is kept with
``iscrowd=True``: never a target, never a negative, never counted), ``keypoints`` (17 x [x, y, v], where
``num_keypoints > 0``), the string values of an ``attributes`` dict (the schema lists each one's values found,
sorted), and ``granularity`` / ``parent_id`` where a file has them (the world's export). An instance's id is
its annotation's id; a record's key is its image's id.

COCO is labelled exhaustively: a record's ``negative_categories`` are every category of the file, and a count
question is asked per category present (``count_questions``). LVIS is federated: only an image's
``neg_category_ids`` are negatives, and the categories of its ``not_exhaustive_category_ids`` are neither
negatives nor counted; its names are read with spaces for underscores (LVIS's "teddy_bear" is COCO's "teddy
bear"), and an image without ``file_name`` is found by its ``coco_url`` as COCO lays its images out,
``images/train2017/000000391895.jpg``, or else ``images/000000391895.jpg``. Either way the category of an
annotation skipped on an image is not taught absent there nor counted (the file says it is there), nor is a
crowd's. Each non-crowd instance has a region text with its category (region-category questions).

The file is read once and indexed (``PackedRows``); ``record(i)`` builds image ``i``'s record from its row.
Images are not opened: one missing on disk is skipped at load time, by a cheap ``is_file``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

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
    image_size,
    load_json_file,
    skip,
    valid_mask,
)
from perceive.images import ImageError

COCO_EXPECTED = "a COCO instances JSON (an object with images, annotations and categories lists)"


def _looks_like(data: object) -> str:
    """What a JSON value of the wrong kind for a COCO reader seems to be, for its error."""
    if isinstance(data, list):
        return " (it is a list: RefCOCO refs?)"
    if isinstance(data, dict):
        anns = data.get("annotations")
        if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "segments_info" in anns[0]:
            return " (it is COCO panoptic: use format 'panoptic')"
    return ""


class CocoSource(Source):
    """The images of a COCO-format instances (or keypoints) file, one record each."""

    name = "coco"
    expected = COCO_EXPECTED
    kinds: tuple[str, ...] | None = None  # COCO has no referring expressions

    def __init__(self, annotations: str | Path, images: str | Path, strict: bool = False) -> None:
        self.path = Path(annotations)
        self.images = Path(images)
        self.strict = strict
        self.skipped = Skipped()
        self.lost_images: set = set()  # ids of images skipped: their annotations go silently with them
        data = load_json_file(self.path, self.expected)
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise FormatError(f"{self.path}: not {self.expected}{_looks_like(data)}")
        names = self._read_categories(data["categories"])
        self.categories = list(dict.fromkeys(names[k] for k in sorted(names)))  # id order, a name once
        rows = self._read_images(data["images"], names)
        attribute_values = self._read_annotations(data["annotations"], names, rows)
        del data
        self.schema = AttributeSchema(
            {"category": self.categories, **{k: sorted(v) for k, v in sorted(attribute_values.items())}}
        )
        self.image_index = {image_id: i for i, image_id in enumerate(rows)}  # a file's image id -> record
        self._rows = PackedRows(rows.values())

    def _skip(self, reason: str, where: str) -> None:
        skip(self.skipped, self.strict, reason, where)

    # -- what LVIS and the world's export read otherwise ------------------------------------------------------

    def _category_name(self, name: str) -> str:
        return name

    def _image_file(self, image: dict) -> Path | None:
        name = image.get("file_name")
        return self.images / name if isinstance(name, str) and name else None

    def _image_extra(self, image: dict, where: str, names: dict[int, str]) -> dict:
        """What a record needs of its image entry beyond its file and size."""
        return {}

    def _attributes(self, attributes: object) -> dict | None:
        if not isinstance(attributes, dict):
            return None
        kept = {k: v for k, v in attributes.items() if isinstance(k, str) and isinstance(v, str)}
        return kept or None

    def _has_keypoints(self, ann: dict) -> bool:
        n = ann.get("num_keypoints")
        return isinstance(n, int) and n > 0

    def _negatives(self, extra: dict) -> list[str]:
        return list(self.categories)

    def _uncountable(self, extra: dict) -> set[str]:
        return set()

    # -- reading -------------------------------------------------------------------------------------------

    def _read_categories(self, categories: list) -> dict[int, str]:
        found = coco_categories(categories, str(self.path), self._skip)
        return {cid: self._category_name(name) for cid, (name, _) in found.items()}

    def _read_images(self, images: list, names: dict[int, str]) -> dict[Any, list]:
        """Image id -> its row ``[id, file, width, height, annotations, extra]`` for the images found on disk."""
        rows: dict[Any, list] = {}
        for k, image in enumerate(images):
            image_id = image.get("id") if isinstance(image, dict) else None
            where = f"{self.path}: images[{k}] (id {image_id!r})"
            if not isinstance(image_id, (int, str)) or isinstance(image_id, bool) or image_id in rows:
                self._skip("malformed image entry", where)
                continue
            file = self._image_file(image)
            if file is None:
                self._skip("malformed image entry", f"{where}: no file_name")
                self.lost_images.add(image_id)
                continue
            if not file.is_file():
                self._skip("missing image", f"{where}: {file}")
                self.lost_images.add(image_id)
                continue
            width, height = image.get("width"), image.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                try:  # a file without sizes: the image's header has them
                    width, height = image_size(file)
                except ImageError:
                    self._skip("unreadable image", f"{where}: {file}")
                    self.lost_images.add(image_id)
                    continue
            extra = self._image_extra(image, where, names)
            extra["unsure"] = []
            rows[image_id] = [image_id, str(file), width, height, [], extra]
        return rows

    def _read_annotations(self, annotations: list, names: dict[int, str], rows: dict[Any, list]) -> dict:
        """Each usable annotation into its image's row, as ``[id, box, category, iscrowd, mask, keypoints,
        attributes, part, parent]``; the values each attribute takes, by name."""
        seen_ids: set[int] = set()
        values: dict[str, set[str]] = {}
        for k, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self._skip("malformed annotation", f"{self.path}: annotations[{k}]")
                continue
            where = f"{self.path}: annotations[{k}] (id {ann.get('id')!r})"
            image_id = ann.get("image_id")
            hashable = isinstance(image_id, (int, str))
            if hashable and image_id in self.lost_images:
                continue  # its image is counted already
            row = rows.get(image_id) if hashable else None
            if row is None:
                self._skip("unknown image", f"{where}: image_id {image_id!r}")
                continue
            category_id = ann.get("category_id")
            category = names.get(category_id) if isinstance(category_id, int) else None
            if category is None:
                self._skip("unknown category", f"{where}: category_id {ann.get('category_id')!r}")
                continue
            width, height, extra = row[2], row[3], row[5]
            ann_id = ann.get("id")
            bbox = finite_numbers(ann.get("bbox"), 4)
            box, why = None, "annotation without a unique id"
            if isinstance(ann_id, int) and not isinstance(ann_id, bool) and ann_id not in seen_ids:
                why = "malformed bbox"
                if bbox is not None:
                    box, why = clip_box([bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1] + bbox[3]], width, height)
            if box is None:
                extra["unsure"].append(category)  # what the file says is there: not taught absent, not counted
                detail = "" if bbox is None else f": bbox {ann.get('bbox')!r} in a {width}x{height} image"
                self._skip(why, where + detail)
                continue
            seen_ids.add(int(ann_id))  # type: ignore[arg-type]
            mask = ann.get("segmentation")
            if isinstance(mask, list):  # a ring of under three points has no area (a few are in COCO's files)
                mask = [ring for ring in mask if not isinstance(ring, list) or len(ring) >= 6] or None
            if mask is not None and not valid_mask(mask, width, height):
                self._skip("malformed segmentation (instance kept without a mask)", where)
                mask = None
            keypoints = None
            if self._has_keypoints(ann):
                flat = finite_numbers(ann.get("keypoints"), 51)
                if flat is None:
                    self._skip("malformed keypoints (instance kept without them)", where)
                else:
                    keypoints = [flat[j : j + 3] for j in range(0, 51, 3)]
                    for kp in keypoints:
                        kp[2] = int(kp[2])
            attributes = self._attributes(ann.get("attributes"))
            for name, value in (attributes or {}).items():
                if isinstance(value, str):
                    values.setdefault(name, set()).add(value)
            parent = ann.get("parent_id")
            crowd, part = int(bool(ann.get("iscrowd", 0))), int(ann.get("granularity") == "part")
            row[4].append([ann_id, box, category, crowd, mask, keypoints, attributes, part,
                           parent if isinstance(parent, int) else None])  # fmt: skip
        return values

    # -- records -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rows)

    def row(self, index: int) -> list:
        """Image ``index``'s row as indexed: ``[id, file, width, height, annotations, extra]``."""
        return self._rows[index]

    def record(self, index: int) -> ImageRecord:
        image_id, file, width, height, anns, extra = self._rows[index]
        ids = {a[0] for a in anns}
        instances = [
            Instance(ann_id, box, category, "part" if part else "instance", mask, keypoints, attributes or {},
                     parent if parent in ids else None, bool(crowd))
            for ann_id, box, category, crowd, mask, keypoints, attributes, part, parent in anns
        ]  # fmt: skip
        record = ImageRecord(str(image_id), width, height, Path(file), instances=instances)
        uncountable = {i.category for i in instances if i.iscrowd} | set(extra["unsure"]) | self._uncountable(extra)
        countable = [i for i in instances if i.category not in uncountable]
        record.questions = count_questions(dataclasses.replace(record, instances=countable))
        record.regions = [RegionText(i.id, category=i.category) for i in instances if not i.iscrowd]
        unsure = set(extra["unsure"])
        record.negative_categories = [c for c in self._negatives(extra) if c not in unsure]
        return record


class LvisSource(CocoSource):
    """The images of an LVIS file: COCO's format with LVIS's rules (see the module's docstring)."""

    name = "lvis"
    expected = "an LVIS JSON (an object with images, annotations and categories lists)"

    def _category_name(self, name: str) -> str:
        return name.replace("_", " ")

    def _image_file(self, image: dict) -> Path | None:
        if isinstance(image.get("file_name"), str):
            return super()._image_file(image)
        url = image.get("coco_url")
        if not isinstance(url, str) or "/" not in url:
            return None
        folder, name = url.rsplit("/", 2)[-2:]
        in_split = self.images / folder / name
        return in_split if in_split.is_file() or not (self.images / name).is_file() else self.images / name

    def _image_extra(self, image: dict, where: str, names: dict[int, str]) -> dict:
        extra = {}
        for key, field in (("neg_category_ids", "negatives"), ("not_exhaustive_category_ids", "not_exhaustive")):
            ids = image.get(key, [])
            if not isinstance(ids, list):
                self._skip(f"malformed {key}", where)
                ids = []
            known = [names[c] for c in ids if isinstance(c, int) and c in names]
            if len(known) < len(ids):
                self._skip(f"unknown category in {key}", where)
            extra[field] = known
        return extra

    def _negatives(self, extra: dict) -> list[str]:
        return [c for c in extra["negatives"] if c not in set(extra["not_exhaustive"])]

    def _uncountable(self, extra: dict) -> set[str]:
        return set(extra["not_exhaustive"])
