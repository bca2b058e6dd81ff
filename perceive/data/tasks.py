"""ChatRex's tasks as prompt templates (ChatRex, supplementary Tab. 9), turned into question/answer
pairs from a world scene, its language and the list of boxes the model is given.

Every answer is written in ChatRex's released format (``perceive.formats.chatrex``); object ``k``
is the k-th box given to the model. Indices in a group are in ascending order.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from perceive.data.templates import CHATREX_TEMPLATES, PHRASE_SEPARATOR
from perceive.formats import chatrex
from perceive.world.language import EXPRESSION_KINDS, SceneLanguage, evaluate
from perceive.world.scene import ITEMS, PARTS, SHAPES, Scene

TASKS = ("detect", "refer", "region_category", "region_phrase", "region_brief", "region_sentence", "count",
         "caption_brief", "caption_detailed", "region_qa")  # fmt: skip


@dataclass
class QA:
    task: str
    question: str
    answer: str
    groups: list[list[int]] = field(default_factory=list)  # box indices each grounded phrase points at
    phrases: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def template_texts() -> list[str]:
    """Every fixed word of the templates and answers (for building the world tokenizer)."""
    return [*CHATREX_TEMPLATES.values(), "There are None", "yes no nothing nobody", *SHAPES, *ITEMS, *PARTS]


def _indices(box_objects: list[int | None], ids: list[int]) -> list[int]:
    wanted = set(ids)
    return sorted(k for k, o in enumerate(box_objects) if o in wanted)


def _refs(keys: list[int]) -> str:
    return PHRASE_SEPARATOR.join(f"<obj{k}>" for k in keys)


def detect(scene: Scene, box_objects: list[int | None], rng: random.Random) -> QA:
    """Category detection, one or several categories (';'-separated), sometimes one that is absent."""
    present = sorted({o.category for o in scene.objects if o.id in box_objects})
    names = rng.sample(present, min(len(present), rng.choice([1, 1, 2, 3])))
    if rng.random() < 0.15:
        absent = [c for c in (*SHAPES, *ITEMS, "person") if c not in present]
        if absent:
            names.append(rng.choice(absent))
            rng.shuffle(names)
    groups = [_indices(box_objects, [o.id for o in scene.objects if o.category == n]) for n in names]
    answer = chatrex.render_groups(zip(names, groups, strict=True))
    return QA("detect", CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(names)), answer, groups, names)


def check_refer_options(kind_weights: dict[str, float] | None, max_expressions: int) -> None:
    """Refuse what ``refer`` could not draw by: unknown kinds, weights <= 0, fewer than one expression."""
    if kind_weights is not None:
        unknown = set(kind_weights) - set(EXPRESSION_KINDS)
        if unknown:
            raise ValueError(f"unknown expression kinds {sorted(unknown)}; known: {EXPRESSION_KINDS}")
        if not all(w > 0 for w in kind_weights.values()):
            raise ValueError(f"refer_weights must be positive, got {kind_weights}")
    if max_expressions < 1:
        raise ValueError(f"refer_expressions must be at least 1, got {max_expressions}")


def refer(
    scene: Scene,
    lang: SceneLanguage,
    box_objects: list[int | None],
    rng: random.Random,
    max_expressions: int = 3,
    kind_weights: dict[str, float] | None = None,
) -> QA | None:
    """Referring (single- and multi-instance, rejections included), one to ``max_expressions``
    expressions a query.

    ``kind_weights`` (``"domain/sub_domain"`` -> weight, 1 where absent) makes an expression of a
    scene that many times as likely to be drawn; None draws them uniformly."""
    if not lang.expressions:
        return None
    n = min(len(lang.expressions), rng.randint(1, max_expressions))
    if kind_weights is None:
        exprs = rng.sample(lang.expressions, n)
    else:  # weighted draw without replacement (Efraimidis & Spirakis): the n largest u ** (1 / w)
        keys = [rng.random() ** (1.0 / kind_weights.get(e.kind, 1.0)) for e in lang.expressions]
        exprs = [lang.expressions[i] for i in sorted(range(len(keys)), key=lambda i: -keys[i])[:n]]
    phrases = [e.text for e in exprs]
    groups = [_indices(box_objects, e.answer) for e in exprs]
    answer = chatrex.render_groups(zip(phrases, groups, strict=True))
    meta = {
        "domains": [e.domain for e in exprs],
        "sub_domains": [e.sub_domain for e in exprs],
        "programs": [e.program for e in exprs],
        # the boxes of the object each expression is about ("next to the red square"), empty without one
        "anchors": [_indices(box_objects, evaluate(scene, e.program["anchor"])) if "anchor" in e.program else []
                    for e in exprs],
    }  # fmt: skip
    return QA(
        "refer", CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(phrases)), answer, groups, phrases, meta
    )


def region_caption(
    scene: Scene, lang: SceneLanguage, box_objects: list[int | None], rng: random.Random, granularity: str
) -> QA | None:
    """Region captions at ChatRex's four granularities; one or two regions a query."""
    texts = {r.object: r for r in lang.regions}
    field_of = {"region_category": "category", "region_phrase": "short_phrase", "region_brief": "brief",
                "region_sentence": "referring"}[granularity]  # fmt: skip
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


def count(scene: Scene, lang: SceneLanguage, box_objects: list[int | None], rng: random.Random) -> QA | None:
    qs = [q for q in lang.questions if q.kind == "count"]
    if not qs:
        return None
    q = rng.choice(qs)
    m = re.match(r"How many (.+) are there\?", q.question)
    if m is None:  # pragma: no cover - the world writes every counting question this way
        return None
    phrase = m[1]
    group = _indices(box_objects, q.answer_objects)
    # the objects first, then their number: the model counts the indices it has just written
    answer = chatrex.render_groups([(phrase, group)]) + f". There are {len(group)}."
    return QA("count", CHATREX_TEMPLATES["count"].format(obj=phrase), answer, [group], [phrase], {"count": len(group)})


def caption(scene: Scene, lang: SceneLanguage, box_objects: list[int | None], kind: str) -> QA:
    cap = next(c for c in lang.captions if c.kind == kind)
    groups = [chatrex.GroundedPhrase(p["phrase"], tuple(_indices(box_objects, p["objects"])), tuple(p["span"]))
              for p in cap.phrases]  # fmt: skip
    answer = chatrex.render(cap.text, groups)
    return QA(kind, CHATREX_TEMPLATES[kind], answer, [list(g.indices) for g in groups], [g.phrase for g in groups])


def region_qa(scene: Scene, lang: SceneLanguage, box_objects: list[int | None], rng: random.Random) -> QA | None:
    """Questions about a region, answered in grounded format (ChatRex's grounded conversation)."""
    qs = [q for q in lang.questions if q.kind == "region_qa" and all(o in box_objects for o in q.objects)]
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
    scene: Scene,
    lang: SceneLanguage,
    box_objects: list[int | None],
    rng: random.Random,
    refer_weights: dict[str, float] | None = None,
    refer_expressions: int = 3,
) -> QA | None:
    """One question/answer pair of ``task``, or None when the scene cannot pose it (``refer_weights``
    and ``refer_expressions``: ``refer``'s ``kind_weights`` and ``max_expressions``)."""
    if task == "detect":
        return detect(scene, box_objects, rng)
    if task == "refer":
        return refer(scene, lang, box_objects, rng, refer_expressions, refer_weights)
    if task.startswith("region_") and task != "region_qa":
        return region_caption(scene, lang, box_objects, rng, task)
    if task == "count":
        return count(scene, lang, box_objects, rng)
    if task in ("caption_brief", "caption_detailed"):
        return caption(scene, lang, box_objects, task)
    if task == "region_qa":
        return region_qa(scene, lang, box_objects, rng)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
