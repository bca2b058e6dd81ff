"""Training batches from records (``perceive.data.records``): the synthetic world streamed with no disk, or
the field's annotation files, each batch a function of the step alone, so a killed run resumes exactly.

Boxes follow ChatRex Sec. 4.2: the record's ground-truth boxes mixed with proposals, at most 100,
shuffled. With a UPN (or proposals computed once for a file source), each ground-truth object that a
proposal covers (IoU >= 0.5) is represented by that proposal (what the model sees at inference), the
others keep their true box, and the remaining proposals are distractors: those that cover no object,
and with ``near_duplicates`` also a second proposal of an object already represented (at inference such
duplicates are in the list, and naming both counts one as a false positive). ``box_mixing="chatrex"``
is ChatRex's own rule instead: every ground-truth box kept as it is, and the proposals added but those
with IoU > 0.9 to one of them.

With ``questions_per_scene`` k > 1, items ``k*s .. k*s + k - 1`` ask k questions about image s over
the same shuffled boxes, and a batch encodes each image once (``image_index``): the image, its
proposals and the vision encoders cost a k-th as much per question.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from perceive.boxes import box_iou, match_one_to_one
from perceive.data.records import AttributeSchema, ImageRecord
from perceive.data.sources.world import WORLD_ORDER_GROUPINGS, WorldSource, world_schema
from perceive.data.tasks import QA, TASKS, check_refer_options, feeds, make_qa
from perceive.models.chatrex.object_order import order_feature_index
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.world.generator import WorldConfig

DEFAULT_TASK_WEIGHTS = {
    "detect": 2.0, "refer": 4.0, "region_category": 1.5, "region_phrase": 1.0, "region_brief": 0.5,
    "region_sentence": 0.5, "count": 1.5, "caption_brief": 0.5, "caption_detailed": 0.25, "region_qa": 1.0,
}  # fmt: skip
BOX_MIXINGS = ("proposals_stand_in", "chatrex")
CHATREX_DUPLICATE_IOU = 0.9  # ChatRex Sec. 4.2: a proposal this close to a ground-truth box is dropped
WORLD_ATTRIBUTES = world_schema().classes()  # what the world labels, name -> classes


class RecordStream(Protocol):
    """What a task stream draws its images from: the record of image ``index`` of a stream seeded ``seed``."""

    schema: AttributeSchema
    kinds: tuple[str, ...] | None  # the kinds of expression the data has, where it says

    def record_for(self, seed: int, index: int) -> ImageRecord: ...


class WorldStream:
    """The world as a stream: image ``index`` of seed ``seed`` is scene ``seed * 1_000_003 + index``."""

    def __init__(self, config: WorldConfig, masks: bool = False) -> None:
        self.source = WorldSource(config, masks=masks)
        self.schema = self.source.schema
        self.kinds: tuple[str, ...] | None = self.source.kinds

    def record_for(self, seed: int, index: int) -> ImageRecord:
        return self.source.record(seed * 1_000_003 + index)


def model_options(
    schema: AttributeSchema, attributes: list[str] | None = None, order_groupings: list[list[str]] | None = None
) -> dict:
    """The configuration fields that the training data decides: heads for ``attributes`` (None: every one the
    data labels), those of them read from the RoI grid, and the ``order_groupings`` (default
    ``WORLD_ORDER_GROUPINGS``) that the data's heads can count by."""
    labelled = schema.classes()
    names = list(labelled) if attributes is None else list(attributes)
    unknown = sorted(set(names) - set(labelled))
    if unknown:
        raise ValueError(f"the data does not label {unknown}; it labels {', '.join(labelled)}")
    wanted = [list(g) for g in (order_groupings if order_groupings is not None else WORLD_ORDER_GROUPINGS)]
    groupings = [g for g in wanted if set(g) <= set(names)] or [["category"]]
    return {
        "attribute_heads": {n: labelled[n] for n in names},
        "grid_attribute_heads": [n for n in names if n in schema.grid],
        "order_groupings": groupings,
    }


def world_model_options(attributes: list[str] | None = None, order_groupings: list[list[str]] | None = None) -> dict:
    """``model_options`` of the world, which labels every attribute its order groupings name."""
    wanted = order_groupings if order_groupings is not None else WORLD_ORDER_GROUPINGS
    unknown = sorted({h for g in wanted for h in g} - set(WORLD_ATTRIBUTES))
    if unknown:
        raise ValueError(f"the world does not label {unknown}; it labels {', '.join(WORLD_ATTRIBUTES)}")
    try:
        return model_options(world_schema(), attributes, wanted)
    except ValueError as e:
        raise ValueError(str(e).replace("the data", "the world")) from None


@dataclass
class Item:
    example: dict
    image: np.ndarray
    boxes: np.ndarray  # normalised xyxy
    box_objects: list[int | None]
    attributes: list[list[int]]
    record: ImageRecord
    qa: QA


class TaskStream:
    """ChatRex's tasks over the records of ``data``: item ``index`` is one question on one image."""

    def __init__(
        self,
        processor: ChatRexProcessor,
        data: RecordStream,
        seed: int = 0,
        task_weights: dict[str, float] | None = None,
        upn=None,
        answer_format: str = "indices",
        near_duplicates: bool = False,
        refer_weights: dict[str, float] | None = None,
        refer_expressions: int = 3,
        questions_per_scene: int = 1,
        proposals=None,
        box_mixing: str = "proposals_stand_in",
    ) -> None:
        """``upn`` proposes boxes for each batch's images; ``proposals`` (a ``perceive.train.proposals``
        cache, ``get(record)`` -> boxes or None) gives those computed once for a file source instead."""
        self.processor = processor
        self.data = data
        self.seed = seed
        weights = task_weights or DEFAULT_TASK_WEIGHTS
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        self.tasks = [t for t in weights if weights[t] > 0]
        self.weights = [weights[t] for t in self.tasks]
        self.upn = upn
        self.proposals = proposals
        if answer_format not in ("indices", "coordinates"):
            raise ValueError(f"answer_format must be 'indices' or 'coordinates', got {answer_format!r}")
        if answer_format == "coordinates" and set(self.tasks) - {"detect", "refer"}:
            raise ValueError("the coordinate format is for detection and referring tasks only")
        if box_mixing not in BOX_MIXINGS:
            raise ValueError(f"box_mixing must be one of {BOX_MIXINGS}, got {box_mixing!r}")
        self.answer_format = answer_format
        self.near_duplicates = near_duplicates
        self.box_mixing = box_mixing
        check_refer_options(refer_weights, refer_expressions, data.kinds)
        self.refer_weights = refer_weights
        self.refer_expressions = refer_expressions
        if questions_per_scene < 1:
            raise ValueError(f"questions_per_scene must be at least 1, got {questions_per_scene}")
        self.questions_per_scene = questions_per_scene
        # the label columns of the model's attribute heads, which must be what the data labels
        self.attributes = list(getattr(processor.config, "attribute_heads", {}))
        labelled = data.schema.classes()
        unlabelled = [a for a in self.attributes if a not in labelled]
        if unlabelled:
            raise ValueError(f"the model has attribute heads {unlabelled} that the data does not label; it labels "
                             f"{', '.join(labelled) or 'nothing'}")  # fmt: skip

    def boxes_for(
        self, record: ImageRecord, rng: random.Random, proposals: np.ndarray | None
    ) -> tuple[np.ndarray, list[int | None]]:
        """The boxes the model is given (xyxy pixels, shuffled) and the instance each stands for (None: a
        proposal of no instance); crowd regions are never given."""
        targets = [i for i in record.instances if not i.iscrowd]
        cap = self.processor.config.max_objects
        if len(targets) > cap:  # more objects than the model takes: a random choice of them
            targets = rng.sample(targets, cap)
        gt = np.array([i.box for i in targets], dtype=np.float32).reshape(-1, 4)
        ids: list[int | None] = [i.id for i in targets]
        boxes = gt.copy()
        if proposals is not None and len(proposals):
            iou = box_iou(torch.from_numpy(gt), torch.from_numpy(proposals))
            if self.box_mixing == "chatrex":  # every true box as it is; proposals but near-copies of one
                close = (iou > CHATREX_DUPLICATE_IOU).any(dim=0).tolist()
                extra = [j for j in range(len(proposals)) if not close[j]]
            else:
                matched = match_one_to_one(iou)
                for i, j in enumerate(matched):
                    if j is not None:
                        boxes[i] = proposals[j]
                # an image with no labelled object (an engine's, say) has every proposal as a distractor
                extra = [j for j in range(len(proposals)) if j not in matched and (
                    self.near_duplicates or not len(gt) or float(iou[:, j].max()) < 0.5)]  # fmt: skip
            extra = extra[: max(0, cap - len(boxes))]
            boxes = np.concatenate([boxes, proposals[extra]]) if extra else boxes
            ids = ids + [None] * len(extra)
        order = list(range(len(boxes)))
        rng.shuffle(order)
        return boxes[order], [ids[k] for k in order]

    def scene_index(self, index: int) -> int:
        """The image that item ``index`` asks about."""
        return index // self.questions_per_scene

    def record(self, scene_index: int) -> ImageRecord:
        return self.data.record_for(self.seed, scene_index)

    def item(
        self,
        index: int,
        task: str | None = None,
        proposals: np.ndarray | None = None,
        record: ImageRecord | None = None,
        image: np.ndarray | None = None,
    ) -> Item:
        """Item ``index``: a question on image ``scene_index(index)`` (``record``, its ``image`` and
        ``proposals`` when the caller has them already)."""
        s = self.scene_index(index)
        rng = random.Random(self.seed * 1_000_003 + s)
        record = record if record is not None else self.record(s)
        image = image if image is not None else record.image()
        boxes, box_objects = self.boxes_for(record, rng, proposals)  # the same order for every question on s
        if index % self.questions_per_scene:  # a further question on the image: draws of its own
            rng.seed(f"{self.seed}/{index}")
        for _ in range(10):
            name = task or rng.choices(self.tasks, self.weights)[0]
            qa = make_qa(name, record, box_objects, rng, self.refer_weights, self.refer_expressions)
            if qa is not None:
                break
        else:  # a file's image may feed few of the tasks (a COCO image has no captions): one of those it feeds
            qa = self._any_task(record, box_objects, rng, task)
        side = max(record.width, record.height)
        if self.answer_format == "coordinates":  # no boxes in; every box written out in 0-999 bins
            qa.answer = coordinate_answer(record, qa.phrases, [[box_objects[k] for k in g] for g in qa.groups])
            ex = self.processor.example(qa.question, 0, qa.answer)
            return Item(ex, image, np.zeros((0, 4), dtype=np.float32), [], [], record, qa)
        ex = self.processor.example(qa.question, len(boxes), qa.answer, qa.groups, rng)
        schema = self.data.schema
        by_id = {i.id: i for i in record.instances}
        attributes = [schema.labels(by_id.get(o) if o is not None else None, self.attributes) for o in box_objects]
        return Item(ex, image, boxes / side, box_objects, attributes, record, qa)

    def _any_task(self, record: ImageRecord, box_objects: list[int | None], rng: random.Random, task: str | None) -> QA:
        """A question of the tasks ``record`` feeds, drawn by this stream's weights; when it feeds none of this
        stream's tasks (a RefCOCO image in the alignment stage, which asks for captions), by the default
        weights among the tasks it does feed; else a clear error."""
        fed = set(feeds(record))
        tasks = [(t, w) for t, w in zip(self.tasks, self.weights, strict=True) if t in fed and task in (None, t)]
        if not tasks and task is None:
            tasks = [(t, w) for t, w in DEFAULT_TASK_WEIGHTS.items() if t in fed]
        while tasks:
            name = rng.choices([t for t, _ in tasks], [w for _, w in tasks])[0]
            qa = make_qa(name, record, box_objects, rng, self.refer_weights, self.refer_expressions)
            if qa is not None:
                return qa
            tasks = [(t, w) for t, w in tasks if t != name]
        raise ValueError(f"{record.key}: none of the tasks {[task] if task else self.tasks} can be posed about this "
                         f"image (it feeds {sorted(fed) or 'none'})")  # fmt: skip

    def batch(self, indices: list[int], task: str | None = None) -> tuple[dict, list[Item]]:
        """The items ``indices`` collated; with several questions on one image, its pixels come once
        and ``image_index`` says which row each prompt reads."""
        scene_ids = list(dict.fromkeys(self.scene_index(i) for i in indices))
        records = [self.record(s) for s in scene_ids]
        images = [r.image() for r in records]
        proposals: list[np.ndarray | None] = [None] * len(records)
        if self.proposals is not None:
            proposals = [self.proposals.get(r) for r in records]
        elif self.upn is not None:
            proposals = list(propose(self.upn, images))
        row_of = {s: r for r, s in enumerate(scene_ids)}
        rows = [row_of[self.scene_index(i)] for i in indices]  # each item's image, as a row of the pixels
        items = [self.item(i, task, proposals[r], records[r], images[r]) for i, r in zip(indices, rows, strict=True)]
        pixels, _ = self.processor.images(images)
        batch = self.processor.collate([it.example for it in items], [it.boxes for it in items])
        if len(records) < len(items):
            batch["image_index"] = torch.tensor(rows)
        k = batch["boxes"].shape[1]
        attrs = torch.full((len(items), k, len(self.attributes)), -100, dtype=torch.long)
        for i, it in enumerate(items):
            if it.attributes and self.attributes:
                attrs[i, : len(it.attributes)] = torch.tensor(it.attributes)
        groupings = getattr(self.processor.config, "order_groupings", [])
        batch.update(pixels, attribute_labels=attrs,
                     **pointer_targets(items, batch["group_positions"].shape[1], k, groupings))  # fmt: skip
        return batch, items


class WorldTasks(TaskStream):
    """``TaskStream`` over the world's scenes, streamed with no disk."""

    def __init__(self, processor: ChatRexProcessor, world: WorldConfig, seed: int = 0, **options) -> None:
        self.world = world
        super().__init__(processor, WorldStream(world), seed, **options)


def order_target(program: dict, groupings: list[list[str]]) -> int:
    """The order feature (``perceive.models.chatrex.object_order.order_features``' column, for a model counting
    by ``groupings``) that an extreme or ordinal expression asks for: "the second red circle from the left" is
    the box with one red circle to its left. -1 for every other program (and for none: an expression from a
    file), for a noun phrase no order grouping counts by, and for a grouping the model does not count by."""
    if program.get("form") not in ("extreme", "ordinal"):
        return -1
    np_ = program["np"]
    if set(np_) - {"kind", "noun", "color", "shirt"} or (np_["kind"] != "person" and "noun" not in np_):
        return -1
    wanted = ["category", "color"] if "color" in np_ or "shirt" in np_ else ["category"]
    if wanted not in groupings:
        return -1
    return order_feature_index(groupings.index(wanted), program["direction"], program.get("k", 1) - 1)


def pointer_targets(items: list[Item], groups: int, boxes: int, groupings: list[list[str]]) -> dict[str, torch.Tensor]:
    """What each referring group's expression tells the pointer's additions, aligned with the collated
    ``group_positions``: ``group_anchors`` ``[B, G, K]`` the boxes of its anchor object (none without one)
    and ``group_order`` ``[B, G]`` its ``order_target`` for the model's order ``groupings`` (-1 without one)."""
    anchors = torch.zeros(len(items), groups, boxes, dtype=torch.bool)
    order = torch.full((len(items), groups), -1, dtype=torch.long)
    for i, it in enumerate(items):
        if not len(it.boxes):  # the coordinate format: no boxes to point at, no groups
            continue
        meta = getattr(it.qa, "meta", {})
        for g, (program, anchor) in enumerate(zip(meta.get("programs", []), meta.get("anchors", []), strict=True)):
            anchors[i, g, anchor] = True
            order[i, g] = order_target(program, groupings)
    return {"group_anchors": anchors, "group_order": order}


def coordinate_answer(record: ImageRecord, phrases: list[str], groups: list[list[int | None]]) -> str:
    """The coordinate baseline's answer (Qwen-VL style): ``phrase [x0, y0, x1, y1], [...]`` per line in
    0-999 bins of the image, ``phrase None`` for a group with no object."""
    from perceive.formats import coords

    lines = []
    extent = (record.width, record.height)
    for phrase, objs in zip(phrases, groups, strict=True):
        boxes = [coords.TextBox(phrase, coords.quantize(record.instance(o).box, extent)) for o in objs if o is not None]
        lines.append(coords.render(boxes) if boxes else f"{phrase} None")
    return "\n".join(lines)


def propose(upn, images: list[np.ndarray]) -> list[np.ndarray]:
    """UPN proposals (xyxy pixels of each image), prepared as at inference (``square_pixels``)."""
    from perceive.models.image_processing import square_pixels

    size = upn.config.image_size
    was_training = upn.training
    upn.eval()
    out = upn.propose(square_pixels(images, size).to(next(upn.parameters()).device))
    upn.train(was_training)
    return [(o["boxes"].float().cpu() * (max(im.shape[:2]) / size)).numpy().astype(np.float32)
            for o, im in zip(out, images, strict=True)]  # fmt: skip
