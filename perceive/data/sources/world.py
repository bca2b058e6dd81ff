"""The synthetic world as a source of records: each scene and its language (``perceive.world``) as an
``ImageRecord``, streamed without touching the disk.

The world labels each object's category, colour (a person's is its shirt's), pattern and size, and what a
person holds and its colour; a question may name as absent any thing of the world (a shape, an item, a
person) that a scene lacks.
"""

from __future__ import annotations

import numpy as np

from perceive.boxes import mask_to_rle
from perceive.data.records import (
    AttributeSchema,
    Caption,
    Expression,
    GroundedPhrase,
    ImageRecord,
    Instance,
    Question,
    RegionText,
    VisualPromptRecord,
)
from perceive.world.export import STUFF_SEGMENT_BASE
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import EXPRESSION_KINDS, SceneLanguage, describe, evaluate
from perceive.world.scene import COLORS, ITEMS, PATTERNS, SHAPES, SIZES, Scene, category_table

# what a question may name as absent: the world's things (its parts are asked about only where a person is)
WORLD_NEGATIVES = (*SHAPES, *ITEMS, "person")
WORLD_KINDS = EXPRESSION_KINDS
# the ways of being alike that ranks among boxes are counted by: "the second circle", "the second red circle"
WORLD_ORDER_GROUPINGS = [["category"], ["category", "color"]]


def world_schema() -> AttributeSchema:
    """The attributes the world labels, each in its class order (categories by id: things, then parts)."""
    categories = [c["name"] for c in sorted(category_table(), key=lambda c: c["id"]) if c["granularity"] != "stuff"]
    values = {"category": categories, "color": list(COLORS), "pattern": list(PATTERNS), "size": list(SIZES),
              "held_item": ["none", *ITEMS], "held_item_color": list(COLORS)}  # fmt: skip
    # what a person holds is read off its box's whole RoI grid
    return AttributeSchema(values, grid=["held_item", "held_item_color"])


def _attributes(scene: Scene, obj_id: int) -> dict[str, str]:
    o = scene.get(obj_id)
    held = scene.get(o.holding) if o.holding is not None else None
    color = o.shirt if o.kind == "person" else o.color
    out = {"color": color, "pattern": o.pattern, "size": o.size,
           # what is not a person holds nothing, so the held-item head learns to say so of a held cup's own box
           "held_item": held.category if held is not None else "none",
           "held_item_color": held.color if held is not None else None}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def stuff_instances(scene: Scene) -> list[Instance]:
    """The scene's visible stuff as the panoptic reader keeps it: crowd regions marked ``stuff``, with masks."""
    out = []
    for k, name in enumerate(scene.stuff_names):
        m = scene.stuff_mask(name)
        if m.any():
            ys, xs = np.nonzero(m)
            box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
            out.append(Instance(STUFF_SEGMENT_BASE + k, box, name, mask=mask_to_rle(m), iscrowd=True,
                                attributes={"stuff": "yes"}))  # fmt: skip
    return out


def scene_record(scene: Scene, lang: SceneLanguage, key: str | None = None, masks: bool = False) -> ImageRecord:
    """A world scene and its language as a record; its instances in the scene's order, ids the scene's. With
    ``masks``, every instance carries its visible mask (COCO RLE) and the visible stuff follows as crowd regions
    marked ``stuff`` (``stuff_instances``)."""
    instances = [
        Instance(o.id, [float(v) for v in o.box], o.category, "part" if o.kind == "part" else "instance",
                 mask=mask_to_rle(scene.mask(o.id)) if masks else None,
                 keypoints=[list(k) for k in o.keypoints] if o.kind == "person" else None,
                 attributes=_attributes(scene, o.id), parent=o.parent)
        for o in scene.objects
    ]  # fmt: skip
    if masks:
        instances += stuff_instances(scene)
    expressions = [
        Expression(e.text, list(e.answer), e.domain, e.sub_domain,
                   anchor=evaluate(scene, e.program["anchor"]) if "anchor" in e.program else None, program=e.program)
        for e in lang.expressions
    ]  # fmt: skip
    captions = [Caption(c.kind, c.text, [GroundedPhrase(p["phrase"], tuple(p["span"]), list(p["objects"]))
                                         for p in c.phrases]) for c in lang.captions]  # fmt: skip
    regions = [RegionText(r.object, r.category, r.short_phrase, r.brief, r.referring or "") for r in lang.regions]
    questions = [Question(q.kind, q.question, q.answer, list(q.objects), list(q.answer_objects))
                 for q in lang.questions]  # fmt: skip
    prompts = [VisualPromptRecord(vp.kind, vp.object, vp.point, vp.box, vp.scribble, vp.mask, vp.question, vp.answer)
               for vp in lang.visual_prompts]  # fmt: skip
    return ImageRecord(key or f"world_{scene.seed}", scene.size, scene.size, pixels=scene.image, instances=instances,
                       expressions=expressions, captions=captions, regions=regions, questions=questions,
                       prompts=prompts, negative_categories=list(WORLD_NEGATIVES), origin=scene)  # fmt: skip


class WorldSource:
    """Scenes of the world drawn from seeds: ``record(n)`` is the scene of seed ``n`` with its language."""

    name = "world"

    def __init__(self, config: WorldConfig, masks: bool = False) -> None:
        self.config = config
        self.masks = masks
        self.schema = world_schema()
        self.kinds = WORLD_KINDS

    def record(self, seed: int) -> ImageRecord:
        scene = generate_scene(seed, self.config)
        return scene_record(scene, describe(scene, self.config), masks=self.masks)
