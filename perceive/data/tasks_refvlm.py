"""REF-VLM's tasks (ref-vlm.txt, Table II) from an image's record: a question (with visual prompts at ``<region>``)
and an answer in TRP form, with the instances each phrase's ``<REF>`` s decode.

- ``refer_box`` / ``refer_mask``: REC / RES from a referring expression; the phrase is ``target`` (the released
  code's); one, several or no targets (no target: ``Unit decode (False)``, the rejection);
- ``interactive``: interactive grounding: a point, box, scribble or mask on one instance; its mask, named by its
  category (the released COCO-interactive answers');
- ``region``: REG: the prompted region's description in words (no unit to decode);
- ``detect`` / ``segment``: FOVD / FOVS: every whole instance, one phrase per category (in reading order of each
  category's first instance), boxes / masks;
- ``keypoint``: every person with keypoints, unit ``box, keypoint``;
- ``caption``: GCG-box: a grounded caption whose phrases carry their objects' boxes (no ``<Task>`` plan).

Every answer that decodes units starts with the ``<Task>`` plan (the released code's VD-CoT): name, unit and count
per phrase. A record that cannot pose a task gives None for it. Prompts are made from an instance's mask the way
COCO-interactive makes them (``prompt_for``), so any dataset with masks trains interactive grounding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from perceive.boxes import box_to_mask, coco_mask_to_array
from perceive.data.records import Caption, Expression, ImageRecord, Instance
from perceive.prompts import VisualPrompt

REFVLM_TASKS = ("refer_box", "refer_mask", "interactive", "region", "detect", "segment", "keypoint", "caption")
REGION = "<region>"

# Table II's evaluation templates, verbatim but for the <image> placeholder (the image leads every prompt)
TEMPLATES = {
    "refer_box": "What are the coordinates of {expression} in the image?",
    "refer_mask": "Provide a segmentation mask for {expression} in the picture.",
    "interactive": f"Please generate a mask based on the region {REGION} in the image.",
    "region": f"For the given image, can you provide a unique description of the area {REGION}?",
    "detect": "Please detect bounding boxes in the image.",
    "segment": "Please segment objects in the image.",
    "keypoint": "Please detect all the people and visualize all the keypoints in the image.",
    "caption": "Please describe the image and detect relevant bounding boxes.",
}
TARGET_PHRASE = "target"
PLAN_TEXTS = ("Unit decode (True). Class name, target unit and number: - Name: Unit: Num:", "Unit decode (False).",
              "box mask keypoint ( ) [ ] ,")  # fmt: skip


@dataclass
class Target:
    box: list[float]  # xyxy pixels
    mask: np.ndarray | None = None  # [H, W] bool where the record has one
    keypoints: list[list[float]] | None = None  # 17 x [x, y, v] pixels


@dataclass
class Group:
    """One phrase of the answer: its name, its units and the instances its ``<REF>`` s decode; ``span``: its
    characters in a grounded caption's text."""

    name: str
    units: tuple[str, ...]
    targets: list[Target]
    span: tuple[int, int] | None = None


@dataclass
class RefVlmItem:
    """``kind``: ``"plan"`` (a ``<Task>`` plan, then the groups as triplets; no groups: ``Unit decode (False)``),
    ``"text"`` (the False plan, then ``text``) or ``"caption"`` (``text`` with the groups inline at their spans)."""

    task: str
    question: str
    kind: str
    groups: list[Group] = field(default_factory=list)
    text: str = ""
    prompts: list[VisualPrompt] = field(default_factory=list)
    objects: list[int] = field(default_factory=list)  # the record's instance ids of the targets, in order


def instance_mask(record: ImageRecord, inst: Instance) -> np.ndarray | None:
    if inst.mask is None:
        return None
    try:
        return coco_mask_to_array(inst.mask, record.height, record.width).astype(bool)
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def target_of(record: ImageRecord, inst: Instance) -> Target:
    return Target([float(v) for v in inst.box], instance_mask(record, inst), inst.keypoints)


def prompt_for(kind: str, mask: np.ndarray, box: list[float], rng: random.Random) -> VisualPrompt:
    """A ``kind`` prompt on an object: a point deep inside its mask, its box, a scribble through it (2-5 points
    inside, left to right), or its mask."""
    if kind == "box":
        return VisualPrompt("box", points=[(box[0], box[1]), (box[2], box[3])])
    if kind == "mask":
        return VisualPrompt("mask", mask=mask)
    depth = ndimage.distance_transform_edt(mask)
    if kind == "point":
        # somewhere in the inner half of the object (COCO-interactive samples its points inside the mask)
        ys, xs = np.nonzero(depth >= depth.max() / 2)
        i = rng.randrange(len(xs))
        return VisualPrompt("point", points=[(float(xs[i]) + 0.5, float(ys[i]) + 0.5)])
    ys, xs = np.nonzero(depth >= min(depth.max(), 2.0))
    picks = sorted(rng.sample(range(len(xs)), min(rng.randint(2, 5), len(xs))), key=lambda i: xs[i])
    if len(picks) < 2:
        picks = picks * 2
    return VisualPrompt("scribble", points=[(float(xs[i]) + 0.5, float(ys[i]) + 0.5) for i in picks])


def whole_instances(record: ImageRecord) -> list[Instance]:
    """The record's named whole objects (no parts, no crowd or stuff regions)."""
    return [i for i in record.instances if not i.iscrowd and i.granularity == "instance" and i.category.strip()]


def everything_item(record: ImageRecord, instances: list[Instance], task: str = "detect") -> RefVlmItem:
    """FOVD (``detect``) or FOVS (``segment``) of ``instances``: one group per category, in reading order of each
    category's first instance (top to bottom, left to right)."""
    unit = "box" if task == "detect" else "mask"
    order = sorted(instances, key=lambda i: (round(i.box[1] / 16), i.box[0]))
    groups: dict[str, Group] = {}
    ids: dict[str, list[int]] = {}
    for inst in order:
        groups.setdefault(inst.category, Group(inst.category, (unit,), [])).targets.append(target_of(record, inst))
        ids.setdefault(inst.category, []).append(inst.id)
    objects = [i for v in ids.values() for i in v]
    return RefVlmItem(task, TEMPLATES[task], "plan", list(groups.values()), objects=objects)


def refer_item(record: ImageRecord, expression: Expression, task: str = "refer_box") -> RefVlmItem:
    """REC (``refer_box``) or RES (``refer_mask``) of one expression: the phrase ``target`` with its answer's
    instances, or the False plan when it has none."""
    question = TEMPLATES[task].format(expression=expression.text.strip().rstrip("."))
    targets = [target_of(record, record.instance(o)) for o in expression.answer]
    groups = [Group(TARGET_PHRASE, ("box" if task == "refer_box" else "mask",), targets)] if targets else []
    return RefVlmItem(task, question, "plan", groups, objects=list(expression.answer))


def interactive_item(record: ImageRecord, inst: Instance, prompt: VisualPrompt) -> RefVlmItem:
    """Interactive grounding of ``inst`` from ``prompt``: its mask, named by its category."""
    group = Group(inst.category, ("mask",), [target_of(record, inst)])
    return RefVlmItem("interactive", TEMPLATES["interactive"], "plan", [group], prompts=[prompt], objects=[inst.id])


def keypoint_people(record: ImageRecord) -> list[Instance]:
    """The record's whole persons with at least one labelled keypoint, left to right."""
    people = [i for i in whole_instances(record) if i.keypoints and any(k[2] > 0 for k in i.keypoints)]
    return sorted(people, key=lambda i: (i.box[0], i.box[1]))


def keypoint_item(record: ImageRecord, persons: list[Instance]) -> RefVlmItem:
    """Keypoint detection of ``persons``: one phrase (their category), unit ``box, keypoint``."""
    group = Group(persons[0].category, ("box", "keypoint"), [target_of(record, i) for i in persons])
    return RefVlmItem("keypoint", TEMPLATES["keypoint"], "plan", [group], objects=[i.id for i in persons])


def caption_item(record: ImageRecord, caption: Caption) -> RefVlmItem | None:
    """GCG-box of a grounded caption: its text with each grounded phrase's boxes inline (phrases that overlap an
    earlier one are left as text); None when no phrase has objects."""
    groups: list[Group] = []
    for p in sorted(caption.phrases, key=lambda p: p.span[0]):
        if p.objects and (not groups or p.span[0] >= groups[-1].span[1]):  # type: ignore[index]
            groups.append(Group(p.phrase, ("box",), [target_of(record, record.instance(o)) for o in p.objects], p.span))
    if not groups:
        return None
    objects = [o for p in caption.phrases for o in p.objects]
    return RefVlmItem("caption", TEMPLATES["caption"], "caption", groups, text=caption.text, objects=objects)


def refvlm_item(record: ImageRecord, task: str, rng: random.Random) -> RefVlmItem | None:
    """One sample of ``task`` from ``record``, or None when the record cannot pose it."""
    by_id = {i.id: i for i in record.instances}
    if task in ("refer_box", "refer_mask"):
        expressions = [e for e in record.expressions if e.text.strip() and all(o in by_id for o in e.answer)]
        if task == "refer_mask":
            expressions = [e for e in expressions if all(by_id[o].mask is not None for o in e.answer)]
        if not expressions:
            return None
        return refer_item(record, rng.choice(expressions), task)
    if task in ("interactive", "region"):
        candidates = [i for i in whole_instances(record) if i.mask is not None]
        if task == "region":
            described = {r.object: r for r in record.regions if r.short_phrase or r.category}
            candidates = [i for i in candidates if i.id in described]
        if not candidates:
            return None
        inst = rng.choice(candidates)
        target = target_of(record, inst)
        if target.mask is None or not target.mask.any():
            return None
        prompt = prompt_for(rng.choice(["point", "box", "scribble", "mask"]), target.mask, target.box, rng)
        if task == "interactive":
            return interactive_item(record, inst, prompt)
        region = described[inst.id]
        return RefVlmItem(task, TEMPLATES[task], "text", text=region.short_phrase or region.category,
                          prompts=[prompt], objects=[inst.id])  # fmt: skip
    if task in ("detect", "segment"):
        instances = whole_instances(record)
        if task == "segment":
            instances = [i for i in instances if i.mask is not None]
        if not instances:
            return None
        return everything_item(record, instances, task)
    if task == "keypoint":
        persons = keypoint_people(record)
        return keypoint_item(record, persons) if persons else None
    if task == "caption":
        captions = [c for c in record.captions if c.phrases and all(o in by_id for p in c.phrases for o in p.objects)]
        return caption_item(record, rng.choice(captions)) if captions else None
    raise ValueError(f"unknown REF-VLM task {task!r}; known: {', '.join(REFVLM_TASKS)}")


def rasterize_prompt(prompt: VisualPrompt, height: int, width: int) -> np.ndarray:
    """``[H, W]`` bool: a box filled, a point as a disc and a scribble as a line (both ``max(H, W) / 32`` in
    radius, about the released code's 10 pixels at 336), a mask as itself."""
    if prompt.kind == "mask":
        assert prompt.mask is not None
        return prompt.mask.astype(bool)
    pts = prompt.points or []
    if prompt.kind == "box":
        (x0, y0), (x1, y1) = pts
        return box_to_mask([x0, y0, x1, y1], (height, width)).numpy().astype(bool)
    from PIL import Image, ImageDraw

    radius = max(1.0, max(height, width) / 32)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for x, y in pts:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=1)
    if len(pts) > 1:
        draw.line(pts, fill=1, width=max(1, round(2 * radius)))
    return np.asarray(canvas, dtype=bool)
