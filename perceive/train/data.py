"""Training batches streamed from the synthetic world: no disk, every batch fresh and reproducible.

Boxes follow ChatRex Sec. 4.2: the scene's ground-truth boxes mixed with proposals, at most 100,
shuffled. With a UPN, each ground-truth object that a proposal covers (IoU >= 0.5) is represented by
that proposal (what the model sees at inference), the others keep their true box, and the remaining
proposals are distractors: those that cover no object, and with ``near_duplicates`` also a second
proposal of an object already represented (at inference such duplicates are in the list, and
naming both counts one as a false positive).

With ``questions_per_scene`` k > 1, items ``k*s .. k*s + k - 1`` ask k questions about scene s over
the same shuffled boxes, and a batch encodes each scene once (``image_index``): the scene, its
language, its proposals and the vision encoders cost a k-th as much per question.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from perceive.boxes import box_iou, match_one_to_one
from perceive.data.tasks import TASKS, check_refer_options, make_qa
from perceive.models.chatrex.object_order import order_feature_index
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import SceneLanguage, describe
from perceive.world.scene import CATEGORY_IDS, COLORS, ITEMS, PATTERNS, SIZES, Scene, category_table

DEFAULT_TASK_WEIGHTS = {
    "detect": 2.0, "refer": 4.0, "region_category": 1.5, "region_phrase": 1.0, "region_brief": 0.5,
    "region_sentence": 0.5, "count": 1.5, "caption_brief": 0.5, "caption_detailed": 0.25, "region_qa": 1.0,
}  # fmt: skip
COLOR_NAMES = list(COLORS)
# what the world labels on each object, name -> classes: the attribute heads a model trained on it gets
WORLD_ATTRIBUTES = {
    "category": sum(c["granularity"] != "stuff" for c in category_table()),  # things and parts, ids 1..15
    "color": len(COLORS),  # a person's is its shirt's
    "pattern": len(PATTERNS),
    "size": len(SIZES),
    "held_item": 1 + len(ITEMS),  # nothing, or one of the items
    "held_item_color": len(COLORS),
}
# attributes about what surrounds an object (what a person holds): a model reads them off the box's whole RoI grid
WORLD_GRID_ATTRIBUTES = ("held_item", "held_item_color")
# the ways of being alike that ranks among boxes are counted by: "the second circle", "the second red circle"
WORLD_ORDER_GROUPINGS = [["category"], ["category", "color"]]


def world_model_options(attributes: list[str] | None = None, order_groupings: list[list[str]] | None = None) -> dict:
    """The configuration fields that training on the world decides: heads for ``attributes`` (None: every one
    the world labels), those of them read from the RoI grid, and the ``order_groupings`` (default
    ``WORLD_ORDER_GROUPINGS``)."""
    names = list(WORLD_ATTRIBUTES) if attributes is None else list(attributes)
    groupings = [list(g) for g in (order_groupings if order_groupings is not None else WORLD_ORDER_GROUPINGS)]
    unknown = sorted({*names, *(h for g in groupings for h in g)} - set(WORLD_ATTRIBUTES))
    if unknown:
        raise ValueError(f"the world does not label {unknown}; it labels {', '.join(WORLD_ATTRIBUTES)}")
    return {
        "attribute_heads": {n: WORLD_ATTRIBUTES[n] for n in names},
        "grid_attribute_heads": [n for n in names if n in WORLD_GRID_ATTRIBUTES],
        "order_groupings": groupings,
    }


def attribute_targets(scene: Scene, obj_id: int | None, names: Sequence[str] = tuple(WORLD_ATTRIBUTES)) -> list[int]:
    """The class indices of a box's object for the attributes ``names`` (``WORLD_ATTRIBUTES``' keys), -100 where
    unknown. What is not a person holds nothing (class 0), so the held-item head learns to say so of a held
    cup's own box."""
    if obj_id is None:
        return [-100] * len(names)
    o = scene.get(obj_id)
    color = o.shirt if o.kind == "person" else o.color
    held = scene.get(o.holding) if o.holding is not None else None
    values = {
        "category": CATEGORY_IDS[o.category] - 1,
        "color": COLOR_NAMES.index(color) if color else -100,
        "pattern": PATTERNS.index(o.pattern) if o.pattern else -100,
        "size": SIZES.index(o.size) if o.size else -100,
        "held_item": 1 + ITEMS.index(held.category) if held is not None else 0,
        "held_item_color": COLOR_NAMES.index(held.color) if held is not None and held.color else -100,
    }
    return [values[n] for n in names]


@dataclass
class Item:
    example: dict
    image: np.ndarray
    boxes: np.ndarray  # normalised xyxy
    box_objects: list[int | None]
    attributes: list[list[int]]
    scene: Scene
    qa: object


class WorldTasks:
    def __init__(
        self,
        processor: ChatRexProcessor,
        world: WorldConfig,
        seed: int = 0,
        task_weights: dict[str, float] | None = None,
        upn=None,
        answer_format: str = "indices",
        near_duplicates: bool = False,
        refer_weights: dict[str, float] | None = None,
        refer_expressions: int = 3,
        questions_per_scene: int = 1,
    ) -> None:
        self.processor = processor
        self.world = world
        self.seed = seed
        weights = task_weights or DEFAULT_TASK_WEIGHTS
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        self.tasks = [t for t in weights if weights[t] > 0]
        self.weights = [weights[t] for t in self.tasks]
        self.upn = upn
        if answer_format not in ("indices", "coordinates"):
            raise ValueError(f"answer_format must be 'indices' or 'coordinates', got {answer_format!r}")
        if answer_format == "coordinates" and set(self.tasks) - {"detect", "refer"}:
            raise ValueError("the coordinate format is for detection and referring tasks only")
        self.answer_format = answer_format
        self.near_duplicates = near_duplicates
        check_refer_options(refer_weights, refer_expressions)
        self.refer_weights = refer_weights
        self.refer_expressions = refer_expressions
        if questions_per_scene < 1:
            raise ValueError(f"questions_per_scene must be at least 1, got {questions_per_scene}")
        self.questions_per_scene = questions_per_scene
        # the label columns of the model's attribute heads, which must be what the world labels
        self.attributes = list(getattr(processor.config, "attribute_heads", {}))
        unlabelled = [a for a in self.attributes if a not in WORLD_ATTRIBUTES]
        if unlabelled:
            raise ValueError(f"the model has attribute heads {unlabelled} that the world does not label; it labels "
                             f"{', '.join(WORLD_ATTRIBUTES)}")  # fmt: skip

    def boxes_for(self, scene: Scene, rng: random.Random, proposals: np.ndarray | None) -> tuple[np.ndarray, list]:
        gt = np.array([o.box for o in scene.objects], dtype=np.float32)
        ids: list[int | None] = [o.id for o in scene.objects]
        boxes = gt.copy()
        if proposals is not None and len(proposals):
            iou = box_iou(torch.from_numpy(gt), torch.from_numpy(proposals))
            matched = match_one_to_one(iou)
            for i, j in enumerate(matched):
                if j is not None:
                    boxes[i] = proposals[j]
            extra = [j for j in range(len(proposals))
                     if j not in matched and (self.near_duplicates or float(iou[:, j].max()) < 0.5)]  # fmt: skip
            room = self.processor.config.max_objects - len(boxes)
            extra = extra[: max(0, room)]
            boxes = np.concatenate([boxes, proposals[extra]]) if extra else boxes
            ids = ids + [None] * len(extra)
        order = list(range(len(boxes)))
        rng.shuffle(order)
        return boxes[order], [ids[k] for k in order]

    def scene_index(self, index: int) -> int:
        """The scene that item ``index`` asks about."""
        return index // self.questions_per_scene

    def scene(self, scene_index: int) -> Scene:
        return generate_scene(self.seed * 1_000_003 + scene_index, self.world)

    def item(
        self,
        index: int,
        task: str | None = None,
        proposals: np.ndarray | None = None,
        scene: Scene | None = None,
        language: SceneLanguage | None = None,
    ) -> Item:
        """Item ``index``: a question on scene ``scene_index(index)`` (``scene``, ``language`` and
        ``proposals`` when the caller has them already)."""
        s = self.scene_index(index)
        rng = random.Random(self.seed * 1_000_003 + s)
        scene = scene if scene is not None else self.scene(s)
        lang = language if language is not None else describe(scene, self.world)
        boxes, box_objects = self.boxes_for(scene, rng, proposals)  # the same order for every question on s
        if index % self.questions_per_scene:  # a further question on the scene: draws of its own
            rng.seed(f"{self.seed}/{index}")
        for _ in range(10):
            name = task or rng.choices(self.tasks, self.weights)[0]
            qa = make_qa(name, scene, lang, box_objects, rng, self.refer_weights, self.refer_expressions)
            if qa is not None:
                break
        else:  # pragma: no cover - "detect" always works
            raise RuntimeError("no task could be posed")
        side = scene.size
        if self.answer_format == "coordinates":  # no boxes in; every box written out in 0-999 bins
            qa.answer = coordinate_answer(scene, qa.phrases, [[box_objects[k] for k in g] for g in qa.groups])
            ex = self.processor.example(qa.question, 0, qa.answer)
            return Item(ex, scene.image, np.zeros((0, 4), dtype=np.float32), [], [], scene, qa)
        ex = self.processor.example(qa.question, len(boxes), qa.answer, qa.groups, rng)
        attributes = [attribute_targets(scene, o, self.attributes) for o in box_objects]
        return Item(ex, scene.image, boxes / side, box_objects, attributes, scene, qa)

    def batch(self, indices: list[int], task: str | None = None) -> tuple[dict, list[Item]]:
        """The items ``indices`` collated; with several questions on one scene, its pixels come once
        and ``image_index`` says which row each prompt reads."""
        scene_ids = list(dict.fromkeys(self.scene_index(i) for i in indices))
        scenes = [self.scene(s) for s in scene_ids]
        languages = [describe(s, self.world) for s in scenes]
        proposals: list[np.ndarray | None] = [None] * len(scenes)
        if self.upn is not None:
            proposals = list(propose(self.upn, [s.image for s in scenes]))
        row_of = {s: r for r, s in enumerate(scene_ids)}
        rows = [row_of[self.scene_index(i)] for i in indices]  # each item's scene, as a row of the pixels
        items = [self.item(i, task, proposals[r], scenes[r], languages[r]) for i, r in zip(indices, rows, strict=True)]
        pixels, _ = self.processor.images([s.image for s in scenes])
        batch = self.processor.collate([it.example for it in items], [it.boxes for it in items])
        if len(scenes) < len(items):
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


def order_target(program: dict, groupings: list[list[str]]) -> int:
    """The order feature (``perceive.models.chatrex.object_order.order_features``' column, for a model counting
    by ``groupings``) that an extreme or ordinal expression asks for: "the second red circle from the left" is
    the box with one red circle to its left. -1 for every other program, for a noun phrase no order grouping
    counts by, and for a grouping the model does not count by."""
    if program["form"] not in ("extreme", "ordinal"):
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


def coordinate_answer(scene: Scene, phrases: list[str], groups: list[list[int | None]]) -> str:
    """The coordinate baseline's answer (Qwen-VL style): ``phrase [x0, y0, x1, y1], [...]`` per line in
    0-999 bins of the image, ``phrase None`` for a group with no object."""
    from perceive.formats import coords

    lines = []
    for phrase, objs in zip(phrases, groups, strict=True):
        boxes = [coords.TextBox(phrase, coords.quantize(scene.get(o).box, (scene.size, scene.size)))
                 for o in objs if o is not None]  # fmt: skip
        lines.append(coords.render(boxes) if boxes else f"{phrase} None")
    return "\n".join(lines)


def propose(upn, images: list[np.ndarray]) -> list[np.ndarray]:
    """UPN proposals (xyxy pixels of each image), prepared as at inference (``square_pixels``)."""
    from perceive.models.image_processing import square_pixels

    size = upn.config.image_size
    was_training = upn.training
    upn.eval()
    out = upn.propose(square_pixels(images, size))
    upn.train(was_training)
    return [(o["boxes"] * (max(im.shape[:2]) / size)).numpy().astype(np.float32)
            for o, im in zip(out, images, strict=True)]  # fmt: skip
