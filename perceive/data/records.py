"""The one annotation record every data source produces: an image and what is known about it.

A reader of the field's files (``perceive.data.sources``) and the synthetic world
(``perceive.data.sources.world``) both turn each image into an ``ImageRecord``; every paradigm's task
builders read records only, so a model trains from a COCO file, a HumanRef file or the world alike.

Conventions: boxes are ``[x0, y0, x1, y1]`` pixels of the image; an instance's ``id`` is unique within
its record, and every other field that points at instances (an expression's answer, a caption's phrase, a
region text, a question) holds those ids; masks are COCO RLE or polygons, as the file had them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GRANULARITIES = ("instance", "part")  # an instance is a whole object; a part is part of one (its ``parent``)


@dataclass
class Instance:
    id: int
    box: list[float]  # xyxy pixels
    category: str
    granularity: str = "instance"  # or "part"
    mask: dict | list | None = None  # COCO RLE (compressed or not) or polygons, at the image's size
    keypoints: list[list[float]] | None = None  # 17 x [x, y, v], COCO's person order
    attributes: dict[str, str] = field(default_factory=dict)  # name -> value, e.g. {"color": "red"}
    parent: int | None = None  # the instance this part belongs to
    iscrowd: bool = False  # a crowd region: never a target to answer with, never a negative


@dataclass
class Expression:
    """A referring expression and the instances it selects (none: a rejection)."""

    text: str
    answer: list[int]
    domain: str = ""  # HumanRef's domain (property, position, interaction, reasoning, rejection), if known
    sub_domain: str = ""
    anchor: list[int] | None = None  # the instances an expression about another object is about, if known
    program: dict | None = None  # the world's program of the expression, if it came from the world

    @property
    def kind(self) -> str:
        """``"domain/sub_domain"``, by which a recipe can draw some kinds more often."""
        return f"{self.domain}/{self.sub_domain}"


@dataclass
class GroundedPhrase:
    phrase: str
    span: tuple[int, int]  # characters of the caption
    objects: list[int]


@dataclass
class Caption:
    kind: str  # "caption_brief" or "caption_detailed"
    text: str
    phrases: list[GroundedPhrase] = field(default_factory=list)


@dataclass
class RegionText:
    """Descriptions of one instance at ChatRex's four granularities (empty where unknown)."""

    object: int
    category: str = ""
    short_phrase: str = ""
    brief: str = ""
    referring: str = ""  # one sentence that selects this instance alone


@dataclass
class Question:
    """A question about the image answered in text, optionally pointing at instances (counting, region QA)."""

    kind: str  # "count" or "region_qa"
    question: str
    answer: str
    objects: list[int] = field(default_factory=list)  # the instances the question names, as <obj0>, <obj1>, ...
    answer_objects: list[int] = field(default_factory=list)  # the instances the answer points at


@dataclass
class VisualPromptRecord:
    """A point, box, scribble or mask on one instance, with a question about the region and its answer."""

    kind: str
    object: int
    point: list[float] | None = None
    box: list[float] | None = None
    scribble: list[list[float]] | None = None
    mask: dict | None = None
    question: str = ""
    answer: str = ""


@dataclass
class ImageRecord:
    """One image and everything a source knows about it."""

    key: str  # unique within its source (a file name, an image id)
    width: int
    height: int
    path: Path | None = None  # the image file; None when ``pixels`` carries it
    pixels: np.ndarray | None = None  # [H, W, 3] uint8, for in-memory sources (the world)
    instances: list[Instance] = field(default_factory=list)
    expressions: list[Expression] = field(default_factory=list)
    captions: list[Caption] = field(default_factory=list)
    regions: list[RegionText] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    prompts: list[VisualPromptRecord] = field(default_factory=list)
    # the categories a question may name as absent from this image when no instance has them: every category of
    # an exhaustively labelled dataset (COCO), only those verified absent for a federated one (LVIS's
    # neg_category_ids); a category not listed is never taught as absent
    negative_categories: list[str] = field(default_factory=list)
    origin: object | None = None  # what the record was made from where that is more (the world's Scene), for checks
    source: int = 0  # the position of its source in a data spec (its key is unique within the source)

    def instance(self, instance_id: int) -> Instance:
        for inst in self.instances:
            if inst.id == instance_id:
                return inst
        raise KeyError(f"{self.key}: no instance {instance_id}")

    def instance_masks(self) -> dict[int, np.ndarray]:
        """Each instance with a mask, decoded: ``[H, W]`` bool by instance id (for benchmarks that read the
        masks of one record several times)."""
        from perceive.boxes import coco_mask_to_array

        return {i.id: coco_mask_to_array(i.mask, self.height, self.width).astype(bool)
                for i in self.instances if i.mask}  # fmt: skip

    def texts(self) -> list[str]:
        """Every text a task may write about this image: names, expressions, captions, descriptions, questions
        and answers (what a word-level tokenizer must know)."""
        out = [i.category for i in self.instances] + list(self.negative_categories)
        out += [e.text for e in self.expressions] + [c.text for c in self.captions]
        out += [p.phrase for c in self.captions for p in c.phrases]
        out += [t for r in self.regions for t in (r.category, r.short_phrase, r.brief, r.referring) if t]
        out += [t for q in self.questions for t in (q.question, q.answer)]
        out += [t for v in self.prompts for t in (v.question, v.answer)]
        return out

    def image(self) -> np.ndarray:
        """The ``[H, W, 3]`` uint8 pixels (decoded from ``path`` when the record has none in memory)."""
        if self.pixels is not None:
            return self.pixels
        if self.path is None:
            raise ValueError(f"{self.key}: the record has neither pixels nor an image path")
        from perceive.images import load_image

        return load_image(self.path)


@dataclass
class AttributeSchema:
    """What a source labels on its instances: each attribute's values in class order (``category`` first).
    A model trained on the source gets one head per attribute (``ChatRexConfig.attribute_heads``), whose
    class ``k`` is ``values[k]``."""

    values: dict[str, list[str]] = field(default_factory=dict)
    grid: list[str] = field(default_factory=list)  # attributes about what surrounds an object (what a person holds)

    def classes(self) -> dict[str, int]:
        return {name: len(v) for name, v in self.values.items()}

    def labels(self, instance: Instance | None, names: list[str]) -> list[int]:
        """Class indices of ``instance`` for the attributes ``names`` (-100 where unknown or unlabelled)."""
        index = self.__dict__.get("_index")
        if index is None:  # value -> class, built once (LVIS has 1,203 categories)
            index = self.__dict__["_index"] = {n: {v: k for k, v in enumerate(vs)} for n, vs in self.values.items()}
        if instance is None:
            return [-100] * len(names)
        return [index.get(n, {}).get(instance.category if n == "category" else instance.attributes.get(n), -100)
                for n in names]  # fmt: skip
