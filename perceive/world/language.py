"""Language from the scene graph, each answer computed by a program over the scene.

Referring expressions follow HumanRef's domains; each is stored with its program (a JSON dict) and
the ids it selects. The definitions a reader (and ``perceive.world.checker``) can rely on:

- a noun phrase selects *instances* (shapes, persons, items; never parts) by category and attributes;
- left/right/top/bottom orderings use box centres; "leftmost", "second from the left" are only
  generated when the chosen object's centre is at least 4% of the image from its neighbours';
- "A to the left of B": A's box ends where B's begins or before (``A.x1 <= B.x0``); "above":
  ``A.y1 <= B.y0``; the anchor B is always unique;
- "next to": two persons with no third person's centre strictly between theirs (left to right)
  and at most 10% of the image between their boxes;
- "largest"/"smallest": by true size, only when it beats the runner-up by 20%;
- negation ("the circles that are not red") keeps the noun and drops one colour;
- a rejection expression is well formed and selects nothing.
Singular wording ("the red circle") is used exactly when one object answers.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from perceive.world.generator import WorldConfig
from perceive.world.scene import COLORS, ITEMS, PATTERNS, SHAPES, SIZES, Scene, WorldObject

ORDINALS = {2: "second", 3: "third", 4: "fourth"}
EXTREMES = {"left": "leftmost", "right": "rightmost", "top": "topmost", "bottom": "bottommost"}
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
SEPARATION = 0.04  # of the image size, between centres in orderings
NEXT_TO_GAP = 0.10  # of the image size
SUPERLATIVE_RATIO = 1.2
NOUN_COLORS = tuple(c for c in COLORS if c != "black")
# every "domain/sub_domain" an expression can have (``Expression.kind``)
EXPRESSION_KINDS = (
    "property/attribute", "property/category", "property/clothing",
    "position/extreme", "position/ordinal", "position/relation",
    "interaction/holding", "interaction/held_by", "interaction/next_to",
    "reasoning/negation", "reasoning/superlative", "reasoning/conjunction", "reasoning/union",
    "rejection/property", "rejection/interaction",
)  # fmt: skip


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# noun phrases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NounPhrase:
    kind: str  # "shape" | "person" | "item"
    noun: str | None = None  # shape or item category; None for any shape ("object")
    color: str | None = None
    pattern: str | None = None
    size: str | None = None
    shirt: str | None = None
    hat: bool | None = None

    def matches(self, o: WorldObject) -> bool:
        if o.kind != self.kind:
            return False
        if self.noun is not None and o.category != self.noun:
            return False
        if self.color is not None and o.color != self.color:
            return False
        if self.pattern is not None and o.pattern != self.pattern:
            return False
        if self.size is not None and o.size != self.size:
            return False
        if self.shirt is not None and o.shirt != self.shirt:
            return False
        return self.hat is None or (o.hat is not None) == self.hat

    def text(self, plural: bool) -> str:
        if self.kind == "person":
            words = "people" if plural else "person"
            if self.shirt:
                words += f" in {self.shirt} shirts" if plural else f" in {article(self.shirt)} {self.shirt} shirt"
            if self.hat is not None:
                words += " with a hat" if self.hat else " without a hat"
            return words
        adjectives = [a for a in (self.size, self.color, self.pattern) if a]
        noun = self.noun or "object"
        return " ".join([*adjectives, noun + ("s" if plural else "")])


def select(scene: Scene, np_: NounPhrase) -> list[WorldObject]:
    return [o for o in scene.instances if np_.matches(o)]


# ---------------------------------------------------------------------------------------------
# programs: JSON dicts, evaluated to sorted instance ids
# ---------------------------------------------------------------------------------------------


def _np_json(np_: NounPhrase) -> dict:
    return {k: v for k, v in asdict(np_).items() if v is not None}


def _np_from(d: dict) -> NounPhrase:
    return NounPhrase(**d)


def _axis(direction: str) -> tuple[int, bool]:
    """(centre coordinate index, descending) for an ordering direction."""
    return {"left": (0, False), "right": (0, True), "top": (1, False), "bottom": (1, True)}[direction]


def ordered(objs: list[WorldObject], direction: str) -> list[WorldObject]:
    axis, desc = _axis(direction)
    return sorted(objs, key=lambda o: o.center[axis], reverse=desc)


def spatial(a: WorldObject, b: WorldObject, rel: str) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return {"left": ax1 <= bx0, "right": ax0 >= bx1, "above": ay1 <= by0, "below": ay0 >= by1}[rel]


def neighbours(scene: Scene, person: WorldObject) -> list[WorldObject]:
    """Persons next to ``person``: no third person's centre strictly between, a small gap."""
    people = scene.of_kind("person")
    out = []
    for other in people:
        if other is person:
            continue
        lo, hi = sorted((person.center[0], other.center[0]))
        if any(lo < p.center[0] < hi for p in people if p is not person and p is not other):
            continue
        a, b = sorted((person, other), key=lambda o: o.center[0])
        if b.box[0] - a.box[2] <= NEXT_TO_GAP * scene.size:
            out.append(other)
    return out


def evaluate(scene: Scene, program: dict) -> list[int]:
    """The ids a program selects, sorted."""
    form = program["form"]
    if form == "np":
        objs = select(scene, _np_from(program["np"]))
    elif form in ("extreme", "ordinal"):
        cands = ordered(select(scene, _np_from(program["np"])), program["direction"])
        k = program.get("k", 1)
        objs = cands[k - 1 : k]
    elif form == "superlative":
        cands = sorted(
            select(scene, _np_from(program["np"])), key=lambda o: o.scale, reverse=program["which"] == "largest"
        )
        objs = cands[:1]
    elif form == "relation":
        anchors = [scene.get(i) for i in evaluate(scene, program["anchor"])]
        objs = [
            o
            for o in select(scene, _np_from(program["np"]))
            if len(anchors) == 1 and o is not anchors[0] and spatial(o, anchors[0], program["relation"])
        ]
    elif form == "next_to":
        anchors = [scene.get(i) for i in evaluate(scene, program["anchor"])]
        near = neighbours(scene, anchors[0]) if len(anchors) == 1 else []
        objs = [o for o in select(scene, _np_from(program["np"])) if o in near]
    elif form == "holding":
        item = _np_from(program["item"])
        objs = [
            o
            for o in select(scene, _np_from(program["np"]))
            if o.holding is not None and item.matches(scene.get(o.holding))
        ]
    elif form == "held_by":
        anchor_ids = evaluate(scene, program["anchor"])
        objs = [
            o for o in select(scene, _np_from(program["np"])) if len(anchor_ids) == 1 and o.held_by == anchor_ids[0]
        ]
    elif form == "not_color":
        np_ = _np_from(program["np"])
        key = "shirt" if np_.kind == "person" else "color"
        objs = [o for o in select(scene, np_) if getattr(o, key) != program["color"]]
    elif form == "holding_nothing":
        objs = [o for o in select(scene, _np_from(program["np"])) if o.holding is None]
    elif form == "union":
        return sorted(set(evaluate(scene, program["a"])) | set(evaluate(scene, program["b"])))
    elif form == "part":
        owners = evaluate(scene, program["owner"])
        objs = [
            p
            for p in scene.objects
            if p.parent in owners and p.category == program["part"] and p.side == program.get("side")
        ]
    else:
        raise ValueError(f"unknown program form {form!r}")
    return sorted(o.id for o in objs)


def render(program: dict, plural: bool) -> str:
    """The words of a program (without the leading "the")."""
    form = program["form"]
    if form == "np":
        return _np_from(program["np"]).text(plural)
    np_text = _np_from(program["np"]).text(plural) if "np" in program else ""
    be = "are" if plural else "is"
    if form == "extreme":
        return f"{EXTREMES[program['direction']]} {np_text}"
    if form == "ordinal":
        return f"{ORDINALS[program['k']]} {np_text} from the {program['direction']}"
    if form == "superlative":
        return f"{program['which']} {np_text}"
    if form == "relation":
        return f"{np_text} {RELATIONS[program['relation']]} the {render(program['anchor'], False)}"
    if form == "next_to":
        return f"{np_text} next to the {render(program['anchor'], False)}"
    if form == "holding":
        item = _np_from(program["item"]).text(False)
        np_ = _np_from(program["np"])
        if np_.shirt is None and np_.hat is None:
            return f"{np_text} holding {article(item)} {item}"
        return f"{np_text} who {be} holding {article(item)} {item}"
    if form == "held_by":
        return f"{np_text} held by the {render(program['anchor'], False)}"
    if form == "not_color":
        return f"{np_text} that {be} not {program['color']}"
    if form == "holding_nothing":
        return f"{np_text} who {be} not holding anything"
    if form == "union":
        a, b = program["a"], program["b"]
        return f"{render(a, program['a_plural'])} and the {render(b, program['b_plural'])}"
    if form == "part":
        name = f"{program['side']} {program['part']}" if program.get("side") else program["part"]
        return f"{name} of the {render(program['owner'], False)}"
    raise ValueError(f"unknown program form {form!r}")


# ---------------------------------------------------------------------------------------------
# referring expressions
# ---------------------------------------------------------------------------------------------


@dataclass
class Expression:
    text: str
    domain: str  # property | position | interaction | reasoning | rejection
    sub_domain: str
    answer: list[int]
    program: dict

    @property
    def kind(self) -> str:
        """``"domain/sub_domain"``, as the benchmark reports it."""
        return f"{self.domain}/{self.sub_domain}"

    def to_json(self) -> dict:
        return asdict(self)


def _phrase_options(o: WorldObject) -> list[NounPhrase]:
    """Noun phrases of growing detail that include ``o``."""
    if o.kind == "shape":
        return [
            NounPhrase("shape", o.category),
            NounPhrase("shape", o.category, o.color),
            NounPhrase("shape", None, o.color),
            NounPhrase("shape", o.category, None, o.pattern),
            NounPhrase("shape", o.category, o.color, o.pattern),
            NounPhrase("shape", o.category, size=o.size),
            NounPhrase("shape", o.category, o.color, size=o.size),
            NounPhrase("shape", o.category, o.color, o.pattern, o.size),
        ]
    if o.kind == "person":
        return [
            NounPhrase("person"),
            NounPhrase("person", shirt=o.shirt),
            NounPhrase("person", hat=o.hat is not None),
            NounPhrase("person", shirt=o.shirt, hat=o.hat is not None),
        ]
    return [NounPhrase("item", o.category), NounPhrase("item", o.category, o.color)]


def _make(scene: Scene, program: dict, domain: str, sub: str, expect_unique: bool = False) -> Expression | None:
    ids = evaluate(scene, program)
    if domain != "rejection" and not ids:
        return None
    if domain == "rejection" and ids:
        return None
    if expect_unique and len(ids) != 1:
        return None
    plural = len(ids) > 1
    return Expression("the " + render(program, plural), domain, sub, ids, program)


def unique_program(scene: Scene, o: WorldObject, allow_relations: bool = True) -> dict | None:
    """The simplest program that selects ``o`` alone, or None."""
    if o.kind == "part":
        owner = unique_program(scene, scene.get(o.parent), allow_relations) if o.parent is not None else None
        if owner is None:
            return None
        return {"form": "part", "part": o.category, "side": o.side, "owner": owner}
    for np_ in _phrase_options(o):
        prog = {"form": "np", "np": _np_json(np_)}
        if evaluate(scene, prog) == [o.id]:
            return prog
    for np_ in _phrase_options(o)[:2]:
        for direction in ("left", "right", "top", "bottom"):
            ordinal = _ordinal_program(scene, o, np_, direction)
            if ordinal is not None:
                return ordinal
    if allow_relations:
        base = _phrase_options(o)[0]
        for anchor in scene.instances:
            if anchor is o:
                continue
            anchor_prog = unique_program(scene, anchor, allow_relations=False)
            if anchor_prog is None or anchor_prog["form"] != "np":
                continue
            for rel in RELATIONS:
                prog = {"form": "relation", "relation": rel, "np": _np_json(base), "anchor": anchor_prog}
                if evaluate(scene, prog) == [o.id]:
                    return prog
    return None


def _ordinal_program(scene: Scene, o: WorldObject, np_: NounPhrase, direction: str) -> dict | None:
    cands = ordered(select(scene, np_), direction)
    if len(cands) < 2 or o not in cands:
        return None
    k = cands.index(o) + 1
    if k > 4:
        return None
    axis, _ = _axis(direction)
    gap = SEPARATION * scene.size
    for j in (k - 2, k):
        if 0 <= j < len(cands) and cands[j] is not o and abs(cands[j].center[axis] - o.center[axis]) < gap:
            return None
    if k == 1:
        return {"form": "extreme", "direction": direction, "np": _np_json(np_)}
    return {"form": "ordinal", "k": k, "direction": direction, "np": _np_json(np_)}


def _absent_np(scene: Scene, rng: random.Random) -> NounPhrase | None:
    """A plausible noun phrase that matches nothing: a present category with an absent colour."""
    present = scene.instances
    if not present:
        return None
    o = rng.choice(present)
    for _ in range(10):
        color = rng.choice(NOUN_COLORS)
        if o.kind == "person":
            cand = NounPhrase("person", shirt=color)
        elif o.kind == "shape":
            cand = NounPhrase("shape", o.category, color)
        else:
            cand = NounPhrase("item", o.category, color)
        if not select(scene, cand):
            return cand
    return None


def referring_expressions(scene: Scene, rng: random.Random, config: WorldConfig) -> list[Expression]:
    """Expressions of every HumanRef domain that this scene supports, single- and multi-instance."""
    out: list[Expression | None] = []
    inst = scene.instances
    shapes, people = scene.of_kind("shape"), scene.of_kind("person")

    # property
    for o in rng.sample(inst, min(3, len(inst))):
        opts = _phrase_options(o)
        np_ = opts[min(len(opts) - 1, rng.randrange(len(opts)))]
        sub = {"shape": "attribute", "person": "clothing", "item": "attribute"}[o.kind]
        if (np_ == NounPhrase(o.kind, np_.noun) and np_.noun is not None) or np_ == NounPhrase("person"):
            sub = "category"
        out.append(_make(scene, {"form": "np", "np": _np_json(np_)}, "property", sub))
    colors = sorted({o.color for o in shapes if o.color})
    if colors:
        out.append(
            _make(
                scene,
                {"form": "np", "np": _np_json(NounPhrase("shape", None, rng.choice(colors)))},
                "property",
                "attribute",
            )
        )

    # position
    for o in rng.sample(inst, min(3, len(inst))):
        np_ = rng.choice(_phrase_options(o)[:2])
        prog = _ordinal_program(scene, o, np_, rng.choice(list(EXTREMES)))
        if prog is not None:
            out.append(_make(scene, prog, "position", prog["form"], expect_unique=True))
    if len(inst) >= 2:
        for _ in range(2):
            anchor = rng.choice(inst)
            anchor_prog = unique_program(scene, anchor, allow_relations=False)
            others = [o for o in inst if o is not anchor]
            if anchor_prog is None or anchor_prog["form"] != "np" or not others:
                continue
            target = rng.choice(others)
            rels = [r for r in RELATIONS if spatial(target, anchor, r)]
            if rels:
                np_ = (
                    _phrase_options(target)[0]
                    if rng.random() < 0.6
                    else NounPhrase(target.kind)
                    if target.kind != "item"
                    else _phrase_options(target)[0]
                )
                prog = {"form": "relation", "relation": rng.choice(rels), "np": _np_json(np_), "anchor": anchor_prog}
                out.append(_make(scene, prog, "position", "relation"))

    # interaction
    holders = [p for p in people if p.holding is not None]
    if holders:
        p = rng.choice(holders)
        item = scene.get(p.holding)  # type: ignore[arg-type]
        item_np = NounPhrase("item", item.category, item.color if rng.random() < 0.4 else None)
        out.append(
            _make(
                scene,
                {"form": "holding", "np": _np_json(NounPhrase("person")), "item": _np_json(item_np)},
                "interaction",
                "holding",
            )
        )
        anchor_prog = unique_program(scene, p, allow_relations=False)
        if anchor_prog is not None and anchor_prog["form"] == "np":
            out.append(
                _make(
                    scene,
                    {"form": "held_by", "np": _np_json(NounPhrase("item", item.category)), "anchor": anchor_prog},
                    "interaction",
                    "held_by",
                )
            )
    for p in rng.sample(people, min(2, len(people))):
        if not neighbours(scene, p):
            continue
        anchor_prog = unique_program(scene, p, allow_relations=False)
        if anchor_prog is None or anchor_prog["form"] == "relation":
            continue
        if config.relation_depth >= 2 and p.holding is not None and rng.random() < 0.5:
            held = scene.get(p.holding)
            deep = {
                "form": "holding",
                "np": _np_json(NounPhrase("person")),
                "item": _np_json(NounPhrase("item", held.category)),
            }
            if evaluate(scene, deep) == [p.id]:
                anchor_prog = deep
        out.append(
            _make(
                scene,
                {"form": "next_to", "np": _np_json(NounPhrase("person")), "anchor": anchor_prog},
                "interaction",
                "next_to",
            )
        )

    # reasoning
    for group in (shapes, people):
        if len(group) >= 2:
            o = rng.choice(group)
            color = o.shirt if o.kind == "person" else o.color
            np_ = (
                NounPhrase("person")
                if o.kind == "person"
                else NounPhrase("shape", o.category if rng.random() < 0.5 else None)
            )
            out.append(
                _make(scene, {"form": "not_color", "np": _np_json(np_), "color": color}, "reasoning", "negation")
            )
    if people and holders and len(holders) < len(people):
        out.append(
            _make(scene, {"form": "holding_nothing", "np": _np_json(NounPhrase("person"))}, "reasoning", "negation")
        )
    for kind_objs in (shapes, people):
        if len(kind_objs) >= 2:
            np_ = NounPhrase(kind_objs[0].kind)
            ranked = sorted(select(scene, np_), key=lambda o: o.scale, reverse=True)
            which = rng.choice(["largest", "smallest"])
            if which == "smallest":
                ranked = ranked[::-1]
            a, b = ranked[0].scale, ranked[1].scale
            if max(a, b) >= SUPERLATIVE_RATIO * min(a, b):
                out.append(
                    _make(
                        scene,
                        {"form": "superlative", "which": which, "np": _np_json(np_)},
                        "reasoning",
                        "superlative",
                        expect_unique=True,
                    )
                )
    if holders:
        p = rng.choice(holders)
        item = scene.get(p.holding)  # type: ignore[arg-type]
        np_ = NounPhrase("person", shirt=p.shirt) if rng.random() < 0.5 else NounPhrase("person", hat=p.hat is not None)
        out.append(
            _make(
                scene,
                {"form": "holding", "np": _np_json(np_), "item": _np_json(NounPhrase("item", item.category))},
                "reasoning",
                "conjunction",
            )
        )
    if len(inst) >= 2:
        oa, ob = rng.sample(inst, 2)
        pa, pb = _phrase_options(oa)[1], _phrase_options(ob)[1]  # category with colour (persons: with shirt)
        ea, eb = (
            evaluate(scene, {"form": "np", "np": _np_json(pa)}),
            evaluate(scene, {"form": "np", "np": _np_json(pb)}),
        )
        if pa != pb and not set(ea) & set(eb):
            out.append(
                _make(
                    scene,
                    {
                        "form": "union",
                        "a": {"form": "np", "np": _np_json(pa)},
                        "a_plural": len(ea) > 1,
                        "b": {"form": "np", "np": _np_json(pb)},
                        "b_plural": len(eb) > 1,
                    },
                    "reasoning",
                    "union",
                )
            )

    # rejection
    absent = _absent_np(scene, rng)
    if absent is not None:
        out.append(_make(scene, {"form": "np", "np": _np_json(absent)}, "rejection", "property"))
    if people:
        missing = [i for i in ITEMS if not any(scene.get(p.holding).category == i for p in holders)]  # type: ignore[arg-type]
        if missing:
            out.append(
                _make(
                    scene,
                    {
                        "form": "holding",
                        "np": _np_json(NounPhrase("person")),
                        "item": _np_json(NounPhrase("item", rng.choice(missing))),
                    },
                    "rejection",
                    "interaction",
                )
            )

    seen: set[str] = set()
    result = []
    for e in out:
        if e is not None and e.text not in seen:
            seen.add(e.text)
            result.append(e)
    return result


# ---------------------------------------------------------------------------------------------
# region descriptions, captions, questions, visual prompts
# ---------------------------------------------------------------------------------------------


def category_name(o: WorldObject) -> str:
    return o.category


def short_phrase(o: WorldObject) -> str:
    if o.kind == "shape":
        return " ".join(w for w in (o.color, o.pattern if o.pattern != "solid" else None, o.category) if w)
    if o.kind == "person":
        return f"person in {article(o.shirt or '')} {o.shirt} shirt"
    if o.kind == "item":
        return f"{o.color} {o.category}"
    name = f"{o.side} {o.category}" if o.side else o.category
    return f"person's {name}"


def brief_description(scene: Scene, o: WorldObject) -> str:
    if o.kind == "shape":
        texture = {"solid": "", "striped": " with stripes", "dotted": " with dots"}[o.pattern or "solid"]
        return f"{article(o.size or '')} {o.size} {o.color} {o.category}{texture}"
    if o.kind == "person":
        words = f"a {o.size} person in {article(o.shirt or '')} {o.shirt} shirt"
        if o.hat:
            words += f" wearing {article(o.hat)} {o.hat} hat"
        if o.holding is not None:
            held = scene.get(o.holding)
            words += f", holding {article(held.color or '')} {held.color} {held.category}"
        return words
    if o.kind == "item":
        owner = scene.get(o.held_by) if o.held_by is not None else None
        base = f"{article(o.color or '')} {o.color} {o.category}"
        return base + (f" held by a person in {article(owner.shirt or '')} {owner.shirt} shirt" if owner else "")
    owner = scene.get(o.parent)  # type: ignore[arg-type]
    name = f"{o.side} {o.category}" if o.side else o.category
    extra = f" {o.color}" if o.category == "hat" else ""
    return f"the{extra} {name} of a person in {article(owner.shirt or '')} {owner.shirt} shirt"


@dataclass
class RegionText:
    object: int
    category: str
    short_phrase: str
    brief: str
    referring: str | None  # one sentence, unique in the scene; None when no simple one exists
    referring_program: dict | None = None


def region_texts(scene: Scene) -> list[RegionText]:
    out = []
    for o in scene.objects:
        prog = unique_program(scene, o)
        sentence = None
        if prog is not None:
            words = render(prog, False)
            sentence = f"The {words}."
        out.append(RegionText(o.id, category_name(o), short_phrase(o), brief_description(scene, o), sentence, prog))
    return out


@dataclass
class GroundedText:
    """Text whose phrases name objects: ``phrases[i] = {"phrase", "span": [s, e], "objects": [ids]}``."""

    kind: str
    text: str
    phrases: list[dict] = field(default_factory=list)


class _Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.phrases: list[dict] = []

    def add(self, s: str, objects: list[int] | None = None) -> None:
        if objects:
            self.phrases.append({"phrase": s, "span": [self.length, self.length + len(s)], "objects": sorted(objects)})
        self.parts.append(s)
        self.length += len(s)

    def text(self) -> str:
        return "".join(self.parts)


NUMBER_WORDS = {
    1: "one",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
    10: "ten",
}


def _count_phrase(n: int, singular: str) -> str:
    if n == 1:
        return f"{article(singular)} {singular}"
    if singular.startswith("person in "):
        shirt = singular.removeprefix("person in ").removeprefix("a ").removeprefix("an ")
        plural = f"people in {shirt}s"
    else:
        plural = singular + "s"
    return f"{NUMBER_WORDS.get(n, str(n))} {plural}"


def _where(scene: Scene, o: WorldObject) -> str:
    cx, cy = o.center
    h = ("left", "center", "right")[min(2, int(3 * cx / scene.size))]
    v = ("top", "middle", "bottom")[min(2, int(3 * cy / scene.size))]
    if h == "center" and v == "middle":
        return "the center"
    if v == "middle":
        return f"the middle {h}"
    return f"the {v} {h}" if h != "center" else f"the {v}"


def captions(scene: Scene) -> list[GroundedText]:
    groups: dict[str, list[int]] = {}
    for o in ordered([o for o in scene.instances if o.kind != "item"], "left"):
        groups.setdefault(short_phrase(o), []).append(o.id)
    stuff = scene.present_stuff()
    brief = _Writer()
    brief.add(f"A picture of {', '.join(stuff[:-1]) + ' and ' + stuff[-1] if len(stuff) > 1 else stuff[0]} with ")
    keys = list(groups)
    for i, key in enumerate(keys):
        if i:
            brief.add(" and " if i == len(keys) - 1 else ", ")
        brief.add(_count_phrase(len(groups[key]), key), groups[key])
    brief.add(".")

    detailed = _Writer()
    for o in ordered([o for o in scene.instances if o.kind != "item"], "left"):
        if detailed.length:
            detailed.add(" ")
        if o.kind == "person":
            words = f"A {o.size} person in {article(o.shirt or '')} {o.shirt} shirt"
            if o.hat:
                words += f" wearing {article(o.hat)} {o.hat} hat"
            detailed.add(words, [o.id])
            if o.holding is not None:
                held = scene.get(o.holding)
                detailed.add(" holds ")
                detailed.add(f"{article(held.color or '')} {held.color} {held.category}", [held.id])
                detailed.add(f" in {_where(scene, o)}.")
            else:
                detailed.add(f" stands in {_where(scene, o)}.")
        else:
            words = brief_description(scene, o)
            detailed.add(words[0].upper() + words[1:], [o.id])
            detailed.add(f" is in {_where(scene, o)}.")
    if stuff:
        detailed.add(f" The background shows {', '.join(stuff)}.")
    return [
        GroundedText("caption_brief", brief.text(), brief.phrases),
        GroundedText("caption_detailed", detailed.text(), detailed.phrases),
    ]


@dataclass
class Question:
    """A question about the scene. ``<obj0>``, ``<obj1>``... in ``question`` name ``objects[0]``, ``objects[1]``..."""

    kind: str
    question: str
    answer: str
    objects: list[int] = field(default_factory=list)  # the regions the question names
    answer_objects: list[int] = field(default_factory=list)  # the objects the answer points at


def counting_questions(scene: Scene, rng: random.Random) -> list[Question]:
    options = [NounPhrase("shape", s) for s in SHAPES] + [NounPhrase("person"), NounPhrase("person", hat=True)]
    options += [NounPhrase("shape", None, c) for c in NOUN_COLORS] + [NounPhrase("item", i) for i in ITEMS]
    present = [np_ for np_ in options if select(scene, np_)]
    absent = [np_ for np_ in options if not select(scene, np_)]
    chosen = rng.sample(present, min(3, len(present))) + rng.sample(absent, min(1, len(absent)))
    out = []
    for np_ in chosen:
        ids = sorted(o.id for o in select(scene, np_))
        out.append(Question("count", f"How many {np_.text(True)} are there?", str(len(ids)), [], ids))
    return out


def region_questions(scene: Scene, rng: random.Random) -> list[Question]:
    out = []
    for o in rng.sample(scene.instances, min(3, len(scene.instances))):
        if o.kind == "shape":
            question, reply = rng.choice(
                [
                    ("What color is <obj0>?", o.color),
                    ("What shape is <obj0>?", o.category),
                    ("What pattern does <obj0> have?", o.pattern),
                    ("How big is <obj0>?", o.size),
                ]
            )
            out.append(Question("region_qa", question, str(reply), [o.id]))
        elif o.kind == "person":
            held = scene.get(o.holding) if o.holding is not None else None
            question, reply, pointed = rng.choice(
                [
                    (
                        "What is <obj0> holding?",
                        f"{article(held.color or '')} {held.color} {held.category}" if held else "nothing",
                        [held.id] if held else [],
                    ),
                    ("What color is the shirt of <obj0>?", o.shirt, []),
                    ("Is <obj0> wearing a hat?", "yes" if o.hat else "no", []),
                ]
            )
            out.append(Question("region_qa", question, str(reply), [o.id], list(pointed)))
        else:
            owner = o.held_by
            out.append(
                Question(
                    "region_qa",
                    "Who is holding <obj0>?",
                    "<obj1>" if owner is not None else "nobody",
                    [o.id] + ([owner] if owner else []),
                    [owner] if owner else [],
                )
            )
    return out


@dataclass
class VisualPrompt:
    """A point, box, scribble or mask that selects ``object`` (REF-VLM's interactive inputs)."""

    kind: str
    object: int
    point: list[float] | None = None
    box: list[float] | None = None
    scribble: list[list[float]] | None = None
    mask: dict | None = None  # COCO RLE
    question: str = "What is in <region>?"
    answer: str = ""


def visual_prompts(scene: Scene, rng: random.Random) -> list[VisualPrompt]:
    from perceive.boxes import mask_to_rle

    out = []
    for o in rng.sample(scene.instances, min(2, len(scene.instances))):
        mask = scene.mask(o.id)
        kind = rng.choice(["point", "box", "scribble", "mask"])
        vp = VisualPrompt(kind, o.id, answer=short_phrase(o))
        if kind == "point":
            dist = ndimage.distance_transform_edt(mask)
            y, x = np.unravel_index(int(np.argmax(dist)), mask.shape)
            vp.point = [float(x) + 0.5, float(y) + 0.5]
        elif kind == "box":
            vp.box = list(o.box)
        elif kind == "scribble":
            ys, xs = np.nonzero(mask)
            picks = sorted(rng.sample(range(len(xs)), min(5, len(xs))), key=lambda i: xs[i])
            vp.scribble = [[float(xs[i]) + 0.5, float(ys[i]) + 0.5] for i in picks]
        else:
            vp.mask = mask_to_rle(mask)
        out.append(vp)
    return out


@dataclass
class SceneLanguage:
    expressions: list[Expression]
    regions: list[RegionText]
    captions: list[GroundedText]
    questions: list[Question]
    visual_prompts: list[VisualPrompt]


def describe(scene: Scene, config: WorldConfig | None = None, seed: int | None = None) -> SceneLanguage:
    """All language for a scene. Deterministic in the scene and ``seed`` (default: the scene's seed)."""
    cfg = config or WorldConfig(size=scene.size)
    rng = random.Random((scene.seed if seed is None else seed) * 7919 + 17)
    return SceneLanguage(
        referring_expressions(scene, rng, cfg),
        region_texts(scene),
        captions(scene),
        counting_questions(scene, rng) + region_questions(scene, rng),
        visual_prompts(scene, rng),
    )


__all__ = ["PATTERNS", "SIZES", "Expression", "NounPhrase", "SceneLanguage", "describe", "evaluate", "render"]
