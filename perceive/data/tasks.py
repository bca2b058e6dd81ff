"""ChatRex's tasks as prompt templates (ChatRex, supplementary Tab. 9), turned into question/answer
pairs from an image's record (``perceive.data.records``) and the list of boxes the model is given.

Every answer is written in ChatRex's released format (``perceive.formats.chatrex``); object ``k``
is the k-th box given to the model, ``box_objects[k]`` the instance id it stands for (None for a
proposal that covers no instance). Indices in a group are in ascending order. A task a record cannot
pose (no expressions, no captions) gives None; ``feeds`` says which tasks a record can pose.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from perceive.data.records import ImageRecord
from perceive.data.templates import CHATREX_TEMPLATES, PHRASE_SEPARATOR
from perceive.formats import chatrex

TASKS = ("detect", "refer", "region_category", "region_phrase", "region_brief", "region_sentence", "count",
         "caption_brief", "caption_detailed", "region_qa")  # fmt: skip
REGION_FIELDS = {"region_category": "category", "region_phrase": "short_phrase", "region_brief": "brief",
                 "region_sentence": "referring"}  # fmt: skip
_COUNT_QUESTION = re.compile(r"How many (.+) are there\?")


@dataclass
class QA:
    task: str
    question: str
    answer: str
    groups: list[list[int]] = field(default_factory=list)  # box indices each grounded phrase points at
    phrases: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _indices(box_objects: list[int | None], ids: list[int]) -> list[int]:
    wanted = set(ids)
    return sorted(k for k, o in enumerate(box_objects) if o in wanted)


def _refs(keys: list[int]) -> str:
    return PHRASE_SEPARATOR.join(f"<obj{k}>" for k in keys)


def feeds(record: ImageRecord) -> list[str]:
    """The tasks ``record`` can pose (before the boxes are chosen)."""
    has = {
        "detect": any(not i.iscrowd for i in record.instances),
        "refer": bool(record.expressions),
        **{task: any(getattr(r, f) for r in record.regions) for task, f in REGION_FIELDS.items()},
        "count": any(q.kind == "count" for q in record.questions),
        "caption_brief": any(c.kind == "caption_brief" for c in record.captions),
        "caption_detailed": any(c.kind == "caption_detailed" for c in record.captions),
        "region_qa": any(q.kind == "region_qa" for q in record.questions),
    }
    return [t for t in TASKS if has[t]]


def detect(record: ImageRecord, box_objects: list[int | None], rng: random.Random) -> QA | None:
    """Category detection, one or several categories (';'-separated), sometimes one that is absent (from the
    record's ``negative_categories``, never a category the image is not known to lack); an image with no
    instance is asked about an absent one."""
    shown = set(box_objects)
    targets = [i for i in record.instances if not i.iscrowd]
    present = sorted({i.category for i in targets if i.id in shown})
    crowded = {i.category for i in record.instances if i.iscrowd}  # a crowd's category is not absent

    def absent() -> list[str]:
        return [c for c in record.negative_categories if c not in present and c not in crowded]

    if present:
        names = rng.sample(present, min(len(present), rng.choice([1, 1, 2, 3])))
        if rng.random() < 0.15:
            candidates = absent()
            if candidates:
                names.append(rng.choice(candidates))
                rng.shuffle(names)
    elif absent():
        names = [rng.choice(absent())]
    else:
        return None
    groups = [_indices(box_objects, [i.id for i in targets if i.category == n]) for n in names]
    answer = chatrex.render_groups(zip(names, groups, strict=True))
    return QA("detect", CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(names)), answer, groups, names)


def check_refer_options(
    kind_weights: dict[str, float] | None, max_expressions: int, known_kinds: tuple[str, ...] | None = None
) -> None:
    """Refuse what ``refer`` could not draw by: weights <= 0, fewer than one expression, and kinds the data
    does not have (when it says which it has: ``known_kinds``)."""
    if kind_weights is not None:
        unknown = set(kind_weights) - set(known_kinds) if known_kinds is not None else set()
        if unknown:
            raise ValueError(f"unknown expression kinds {sorted(unknown)}; known: {known_kinds}")
        if not all(w > 0 for w in kind_weights.values()):
            raise ValueError(f"refer_weights must be positive, got {kind_weights}")
    if max_expressions < 1:
        raise ValueError(f"refer_expressions must be at least 1, got {max_expressions}")


def refer(
    record: ImageRecord,
    box_objects: list[int | None],
    rng: random.Random,
    max_expressions: int = 3,
    kind_weights: dict[str, float] | None = None,
) -> QA | None:
    """Referring (single- and multi-instance, rejections included), one to ``max_expressions``
    expressions a query.

    ``kind_weights`` (``"domain/sub_domain"`` -> weight, 1 where absent) makes an expression of an
    image that many times as likely to be drawn; None draws them uniformly."""
    expressions = record.expressions
    if not expressions:
        return None
    n = min(len(expressions), rng.randint(1, max_expressions))
    if kind_weights is None:
        exprs = rng.sample(expressions, n)
    else:  # weighted draw without replacement (Efraimidis & Spirakis): the n largest u ** (1 / w)
        keys = [rng.random() ** (1.0 / kind_weights.get(e.kind, 1.0)) for e in expressions]
        exprs = [expressions[i] for i in sorted(range(len(keys)), key=lambda i: -keys[i])[:n]]
    phrases = [e.text for e in exprs]
    groups = [_indices(box_objects, e.answer) for e in exprs]
    answer = chatrex.render_groups(zip(phrases, groups, strict=True))
    meta = {
        "domains": [e.domain for e in exprs],
        "sub_domains": [e.sub_domain for e in exprs],
        "programs": [e.program or {} for e in exprs],
        # the boxes of the object each expression is about ("next to the red square"), empty without one
        "anchors": [_indices(box_objects, e.anchor) if e.anchor is not None else [] for e in exprs],
    }
    question = CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(phrases))
    return QA("refer", question, answer, groups, phrases, meta)


def region_caption(
    record: ImageRecord, box_objects: list[int | None], rng: random.Random, granularity: str
) -> QA | None:
    """Region captions at ChatRex's four granularities; one or two regions a query."""
    texts = {r.object: r for r in record.regions}
    field_of = REGION_FIELDS[granularity]
    candidates = [k for k, o in enumerate(box_objects) if o in texts and getattr(texts[o], field_of)]
    if not candidates:
        return None
    keys = sorted(rng.sample(candidates, min(len(candidates), rng.choice([1, 1, 2]))))
    phrases = [getattr(texts[box_objects[k]], field_of) for k in keys]  # type: ignore[index]
    answer = chatrex.render_groups((p, [k]) for p, k in zip(phrases, keys, strict=True))
    return QA(
        granularity,
        CHATREX_TEMPLATES[granularity].format(obj=_refs(keys)),
        answer,
        [[k] for k in keys],
        phrases,
        {"objects": [box_objects[k] for k in keys]},
    )


def count(record: ImageRecord, box_objects: list[int | None], rng: random.Random) -> QA | None:
    qs = [q for q in record.questions if q.kind == "count"]
    if not qs:
        return None
    q = rng.choice(qs)
    m = _COUNT_QUESTION.match(q.question)
    if m is None:  # a source writes every counting question this way (``sources.count_questions``)
        return None
    phrase = m[1]
    group = _indices(box_objects, q.answer_objects)
    # the objects first, then their number: the model counts the indices it has just written
    answer = chatrex.render_groups([(phrase, group)]) + f". There are {len(group)}."
    return QA("count", CHATREX_TEMPLATES["count"].format(obj=phrase), answer, [group], [phrase], {"count": len(group)})


def caption(record: ImageRecord, box_objects: list[int | None], kind: str) -> QA | None:
    cap = next((c for c in record.captions if c.kind == kind), None)
    if cap is None:
        return None
    groups = [chatrex.GroundedPhrase(p.phrase, tuple(_indices(box_objects, p.objects)), (p.span[0], p.span[1]))
              for p in cap.phrases]  # fmt: skip
    answer = chatrex.render(cap.text, groups)
    return QA(kind, CHATREX_TEMPLATES[kind], answer, [list(g.indices) for g in groups], [g.phrase for g in groups])


def region_qa(record: ImageRecord, box_objects: list[int | None], rng: random.Random) -> QA | None:
    """Questions about a region, answered in grounded format (ChatRex's grounded conversation)."""
    qs = [q for q in record.questions if q.kind == "region_qa" and all(o in box_objects for o in q.objects)]
    if not qs:
        return None
    q = rng.choice(qs)
    keys = [box_objects.index(o) for o in q.objects]

    def name(text: str) -> str:
        return re.sub(r"<obj(\d+)>", lambda m: f"<obj{keys[int(m[1])]}>", text)

    question = CHATREX_TEMPLATES["conversation"].format(question=name(q.question))
    if q.answer_objects and not q.answer.startswith("<obj"):
        group = _indices(box_objects, q.answer_objects)
        answer = chatrex.render_groups([(q.answer, group)])
        return QA("region_qa", question, answer, [group], [q.answer])
    return QA("region_qa", question, name(q.answer))


def make_qa(
    task: str,
    record: ImageRecord,
    box_objects: list[int | None],
    rng: random.Random,
    refer_weights: dict[str, float] | None = None,
    refer_expressions: int = 3,
) -> QA | None:
    """One question/answer pair of ``task``, or None when the record cannot pose it (``refer_weights``
    and ``refer_expressions``: ``refer``'s ``kind_weights`` and ``max_expressions``)."""
    if task == "detect":
        return detect(record, box_objects, rng)
    if task == "refer":
        return refer(record, box_objects, rng, refer_expressions, refer_weights)
    if task in REGION_FIELDS:
        return region_caption(record, box_objects, rng, task)
    if task == "count":
        return count(record, box_objects, rng)
    if task in ("caption_brief", "caption_detailed"):
        return caption(record, box_objects, task)
    if task == "region_qa":
        return region_qa(record, box_objects, rng)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
