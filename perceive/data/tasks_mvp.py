"""MVP-LM's tasks (mvp-lm.txt, Sec. 3.3) from an image's record: word-based (a list of names) and sentence-based
(one referring sentence) instructions with the instances they select and a caption for the response.

- ``panoptic``: every thing and stuff name present, with names absent from the image mixed in, shuffled; things are
  the record's whole instances, stuff its crowd regions marked ``stuff`` (``perceive.data.sources.panoptic``);
- ``detect``: some of the names present (parts included) and absent ones; every instance of each;
- ``ground``: the phrases of a grounded caption as the list; each phrase's objects;
- ``refer``: a referring expression; its answer (one, several or no instances).

Each target's label is its name's position in the word list (0 for a sentence). A record that cannot pose a task
(no masks, no expressions, no grounded caption) gives None for it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from perceive.boxes import box_to_mask, coco_mask_to_array
from perceive.data.records import ImageRecord, Instance
from perceive.formats.mvp import Instruction, sentence_instruction, word_instruction

MVP_TASKS = ("panoptic", "detect", "ground", "refer")
MAX_ABSENT = 3  # absent names mixed into a word list


@dataclass
class Target:
    label: int
    box: list[float]  # xyxy pixels
    mask: np.ndarray  # [H, W] bool (the box's rectangle where the record has no mask)
    stuff: bool
    has_mask: bool


@dataclass
class MvpItem:
    task: str
    instruction: Instruction
    caption: str
    targets: list[Target]


def is_stuff(inst: Instance) -> bool:
    return inst.iscrowd and inst.attributes.get("stuff") == "yes"


def _target(record: ImageRecord, inst: Instance, label: int) -> Target:
    mask = None
    if inst.mask is not None:
        try:
            mask = coco_mask_to_array(inst.mask, record.height, record.width)
        except (ValueError, TypeError, KeyError, IndexError):
            mask = None
    if mask is None:
        mask = box_to_mask(inst.box, (record.height, record.width)).numpy()
    return Target(label, [float(v) for v in inst.box], mask, is_stuff(inst), inst.mask is not None)


def brief_caption(record: ImageRecord) -> str:
    """The response's caption: the record's first brief caption, else its first caption, else none."""
    briefs = [c.text for c in record.captions if c.kind == "caption_brief"] or [c.text for c in record.captions]
    return briefs[0].strip() if briefs else ""


def _spellable(name: str) -> bool:
    return bool(name.strip()) and "," not in name


def absent_names(record: ImageRecord, present: set[str], rng: random.Random) -> list[str]:
    """Up to ``MAX_ABSENT`` of the names the record may name as absent that it lacks, drawn by ``rng``."""
    pool = sorted({n for n in record.negative_categories if n not in present and _spellable(n)})
    return rng.sample(pool, min(len(pool), rng.randint(0, MAX_ABSENT)))


def _word_item(task: str, record: ImageRecord, names: list[str], chosen: list[tuple[Instance, str]],
               rng: random.Random) -> MvpItem:  # fmt: skip
    rng.shuffle(names)
    index = {n: i for i, n in enumerate(names)}
    targets = [_target(record, inst, index[name]) for inst, name in chosen]
    return MvpItem(task, word_instruction(names), brief_caption(record), targets)


def mvp_item(record: ImageRecord, task: str, rng: random.Random) -> MvpItem | None:
    """One sample of ``task`` from ``record``, or None when the record cannot pose it."""
    objects = [i for i in record.instances if not i.iscrowd and _spellable(i.category)]
    if task == "panoptic":
        things = [i for i in objects if i.granularity == "instance"]
        stuff = [i for i in record.instances if is_stuff(i) and _spellable(i.category)]
        regions = things + stuff
        if not regions or any(i.mask is None for i in regions):
            return None
        present = sorted({i.category for i in regions})
        names = present + absent_names(record, set(present), rng)
        return _word_item(task, record, names, [(i, i.category) for i in regions], rng)
    if task == "detect":
        present = sorted({i.category for i in objects})
        if not present:
            return None
        asked = rng.sample(present, rng.randint(1, len(present)))
        names = asked + absent_names(record, set(present), rng)
        return _word_item(task, record, names, [(i, i.category) for i in objects if i.category in asked], rng)
    if task == "ground":
        captions = [c for c in record.captions if c.phrases]
        if not captions:
            return None
        caption = rng.choice(captions)
        by_id = {i.id: i for i in record.instances}
        names, chosen = [], []
        for p in caption.phrases:
            phrase = p.phrase.strip()
            if not _spellable(phrase) or phrase in names or not all(o in by_id for o in p.objects):
                continue
            names.append(phrase)
            chosen += [(by_id[o], phrase) for o in p.objects]
        if not names:
            return None
        return _word_item(task, record, names, chosen, rng)
    if task == "refer":
        expressions = [e for e in record.expressions if e.text.strip()]
        if not expressions:
            return None
        e = rng.choice(expressions)
        by_id = {i.id: i for i in record.instances}
        if not all(o in by_id for o in e.answer):
            return None
        targets = [_target(record, by_id[o], 0) for o in e.answer]
        return MvpItem(task, sentence_instruction(e.text), brief_caption(record), targets)
    raise ValueError(f"unknown MVP-LM task {task!r}; known: {', '.join(MVP_TASKS)}")
