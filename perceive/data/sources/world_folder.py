"""A ``perceive world generate`` export folder (``perceive.world.export``) as a source of records (``format:
"world"``, or a data spec that is the folder itself): each image's record is the one
``perceive.data.sources.world.scene_record`` makes of its scene in the stream, read back from the files.

- instances from ``instances.json``, in the scene's order; an instance's id is its annotation's id (``image_id *
  1000 + object id``), parts have their person as ``parent``, persons their 17 keypoints; attributes as
  ``world_schema()`` names them: ``color`` (a person's is its shirt's), ``pattern``, ``size``, and ``held_item`` /
  ``held_item_color`` from what the annotation is ``holding`` ("none" for what holds nothing);
- expressions from ``humanref.jsonl``, with their domains and programs; their ``anchor`` is None, because the
  anchor of an expression about another object is found by evaluating its program over the scene, which the
  files do not hold (a model trained from the folder gets no anchor targets; one from the stream does);
- region texts, captions, counting and region questions, and visual prompts from ``language.jsonl``;
- ``negative_categories`` the world's ``WORLD_NEGATIVES``, the schema ``world_schema()``, the expression kinds
  ``WORLD_KINDS``, and a record's key ``world_<seed>``, the stream's key of the same scene.

Pixels come from ``images/`` (lossless PNG: the scene's own).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from perceive.data.readers import FormatError
from perceive.data.records import (
    Caption,
    Expression,
    GroundedPhrase,
    ImageRecord,
    Question,
    RegionText,
    VisualPromptRecord,
)
from perceive.data.sources import PackedRows, first_line, json_lines
from perceive.data.sources.coco import CocoSource
from perceive.data.sources.world import WORLD_KINDS, WORLD_NEGATIVES, world_schema

# the fields of each type of line of language.jsonl (``perceive.world.export.language_records``)
LANGUAGE_FIELDS = {
    "caption_brief": ("text", "phrases"), "caption_detailed": ("text", "phrases"),
    "region_caption": ("object", "category", "short_phrase", "brief", "referring"),
    "count": ("question", "answer", "objects", "answer_objects"),
    "region_qa": ("question", "answer", "objects", "answer_objects"),
    "visual_prompt": ("kind", "object", "point", "box", "scribble", "mask", "question", "answer"),
}  # fmt: skip


def _named(line: dict) -> list | None:
    """The annotation ids a line of language.jsonl names, None when it is not one the export writes."""
    fields = LANGUAGE_FIELDS.get(line.get("type"))  # type: ignore[arg-type]
    if fields is None or not all(k in line for k in fields):
        return None
    if "phrases" in fields:
        phrases = line["phrases"]
        if not isinstance(phrases, list) or not all(
            isinstance(p, dict) and isinstance(p.get("objects"), list) and isinstance(p.get("span"), list)
            and "phrase" in p for p in phrases
        ):  # fmt: skip
            return None
        return [o for p in phrases for o in p["objects"]]
    if "objects" in fields:
        ok = isinstance(line["objects"], list) and isinstance(line["answer_objects"], list)
        return line["objects"] + line["answer_objects"] if ok else None
    return [line["object"]]


class WorldFolderSource(CocoSource):
    """The scenes of a world export folder, one record each."""

    name = "world"

    def __init__(self, folder: str | Path, strict: bool = False) -> None:
        folder = Path(folder)
        if not (folder / "world.json").is_file():
            raise FormatError(f"{folder}: not a world export folder (it has no world.json)")
        self._names: dict[str, object] = {}  # image file name -> image id, for humanref.jsonl
        super().__init__(folder / "instances.json", folder / "images", strict)
        self.path = folder
        self.schema = world_schema()
        self.kinds: tuple[str, ...] | None = WORLD_KINDS
        language: list[list] = [[[], []] for _ in range(len(self))]  # per record: expressions, language lines
        self._ann_ids = [{a[0] for a in self.row(i)[4]} for i in range(len(self))]
        self._read_humanref(folder / "humanref.jsonl", language)
        self._read_language(folder / "language.jsonl", language)
        del self._ann_ids, self._names
        self._language = PackedRows(language)

    # -- what the world's COCO file says otherwise -----------------------------------------------------------

    def _image_file(self, image: dict) -> Path | None:
        self._names[str(image.get("file_name"))] = image.get("id")
        return super()._image_file(image)

    def _image_extra(self, image: dict, where: str, names: dict[int, str]) -> dict:
        return {"seed": image["seed"]} if isinstance(image.get("seed"), int) else {}

    def _attributes(self, attributes: object) -> dict | None:
        return attributes if isinstance(attributes, dict) else None  # "holding" too, an annotation id

    # -- language ----------------------------------------------------------------------------------------

    def _lines(self, path: Path, expected: str, fields: tuple[str, ...]):
        """``(where, object)`` for each line of ``path`` that is a JSON object; the others skipped and counted."""
        first_line(path, expected, fields)
        for where, line in json_lines(path, self._skip):
            if isinstance(line, dict):
                yield where, line
            else:
                self._skip("malformed line", where)

    def _known(self, index: int, ids: object) -> bool:
        return isinstance(ids, list) and all(isinstance(i, int) and i in self._ann_ids[index] for i in ids)

    def _read_humanref(self, path: Path, language: list[list]) -> None:
        expected = "the world's humanref.jsonl (referring, answer_ids, domain, program)"
        for where, line in self._lines(path, expected, ("referring", "answer_ids")):
            image_id = self._names.get(str(line.get("image_name")))
            index = self.image_index.get(image_id)
            if index is None:
                if image_id not in self.lost_images:
                    self._skip("unknown image", f"{where}: {line.get('image_name')!r}")
                continue
            if not isinstance(line.get("referring"), str) or not isinstance(line.get("program"), dict):
                self._skip("malformed line", where)
            elif not self._known(index, line.get("answer_ids")):
                self._skip("expression naming an unknown annotation", where)
            else:
                language[index][0].append([line["referring"], line["answer_ids"], str(line.get("domain", "")),
                                           str(line.get("sub_domain", "")), line["program"]])  # fmt: skip

    def _read_language(self, path: Path, language: list[list]) -> None:
        expected = "the world's language.jsonl (captions, region texts, questions, visual prompts by type)"
        for where, line in self._lines(path, expected, ("type",)):
            image_id = line.get("image_id")
            index = self.image_index.get(image_id) if isinstance(image_id, (int, str)) else None
            if index is None:
                if not isinstance(image_id, (int, str)) or image_id not in self.lost_images:
                    self._skip("unknown image", f"{where}: image_id {line.get('image_id')!r}")
                continue
            named = _named(line)
            if named is None:
                self._skip("malformed line", f"{where}: type {line.get('type')!r}")
            elif not self._known(index, named):
                self._skip("language naming an unknown annotation", where)
            else:
                language[index][1].append(line)

    # -- records -----------------------------------------------------------------------------------------

    def record(self, index: int) -> ImageRecord:
        record = super().record(index)
        extra = self.row(index)[5]
        if "seed" in extra:
            record.key = f"world_{extra['seed']}"
        raw: dict[int, dict[str, Any]] = {i.id: i.attributes for i in record.instances}  # "holding": an annotation id
        categories: dict[Any, str] = {i.id: i.category for i in record.instances}
        for inst in record.instances:
            attrs = raw[inst.id]
            held = attrs.get("holding")
            out = {"color": attrs.get("shirt") if inst.category == "person" else attrs.get("color"),
                   "pattern": attrs.get("pattern"), "size": attrs.get("size"),
                   "held_item": categories.get(held, "none"),
                   "held_item_color": raw[held].get("color") if held in raw else None}  # fmt: skip
            inst.attributes = {k: v for k, v in out.items() if v is not None}
        expressions, lines = self._language[index]
        record.expressions = [Expression(text, answer, domain, sub_domain, program=program)
                              for text, answer, domain, sub_domain, program in expressions]  # fmt: skip
        record.captions, record.regions, record.questions, record.prompts = [], [], [], []
        for line in lines:
            kind = line["type"]
            if kind in ("caption_brief", "caption_detailed"):
                phrases = [GroundedPhrase(p["phrase"], tuple(p["span"]), p["objects"]) for p in line["phrases"]]
                record.captions.append(Caption(kind, line["text"], phrases))
            elif kind == "region_caption":
                record.regions.append(RegionText(line["object"], line["category"], line["short_phrase"],
                                                 line["brief"], line["referring"] or ""))  # fmt: skip
            elif kind in ("count", "region_qa"):
                record.questions.append(Question(kind, line["question"], line["answer"], line["objects"],
                                                 line["answer_objects"]))  # fmt: skip
            else:
                record.prompts.append(VisualPromptRecord(line["kind"], line["object"], line["point"], line["box"],
                                                         line["scribble"], line["mask"], line["question"],
                                                         line["answer"]))  # fmt: skip
        record.negative_categories = list(WORLD_NEGATIVES)
        return record
