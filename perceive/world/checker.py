"""An independent second evaluator of the world's referring expressions.

It shares nothing with ``perceive.world.language`` but the scene: it reads the expression's *text*
(not its program), parses it with its own small grammar, and computes the answer with plain loops
over the scene graph from the definitions in ``language``'s docstring. Agreement between the two on
every expression is what makes the world's answers trustworthy; disagreement means a bug or an
ambiguous sentence.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from perceive.world.scene import COLORS, ITEMS, SHAPES, Scene, WorldObject

Predicate = Callable[[WorldObject], bool]

_COLOR = "|".join(COLORS)
_SHAPE_NP = re.compile(
    rf"^(?:(?P<size>small|medium|large) )?(?:(?P<color>{_COLOR}) )?(?:(?P<pattern>solid|striped|dotted) )?"
    rf"(?P<noun>{'|'.join(SHAPES)}|object)(?P<pl>s?)$"
)
_PERSON_NP = re.compile(
    rf"^(?P<noun>person|people)(?: in (?:a |an )?(?P<shirt>{_COLOR}) shirts?)?(?: (?P<hat>with|without) a hat)?$"
)
_ITEM_NP = re.compile(rf"^(?:(?P<color>{_COLOR}) )?(?P<noun>{'|'.join(ITEMS)})(?P<pl>s?)$")


class ParseError(ValueError):
    pass


def _np_filter(text: str) -> tuple[Predicate, bool]:
    """(predicate over objects, plural) for a noun phrase."""
    m = _SHAPE_NP.match(text)
    if m:

        def pred(o: WorldObject, m: re.Match = m) -> bool:
            return (
                o.kind == "shape"
                and (m["noun"] == "object" or o.category == m["noun"])
                and m["color"] in (None, o.color)
                and m["pattern"] in (None, o.pattern)
                and m["size"] in (None, o.size)
            )

        return pred, m["pl"] == "s"
    m = _PERSON_NP.match(text)
    if m:

        def pred(o: WorldObject, m: re.Match = m) -> bool:
            hat_ok = m["hat"] is None or (o.hat is not None) == (m["hat"] == "with")
            return o.kind == "person" and m["shirt"] in (None, o.shirt) and hat_ok

        return pred, m["noun"] == "people"
    m = _ITEM_NP.match(text)
    if m:

        def pred(o: WorldObject, m: re.Match = m) -> bool:
            return o.kind == "item" and o.category == m["noun"] and m["color"] in (None, o.color)

        return pred, m["pl"] == "s"
    raise ParseError(f"not a noun phrase: {text!r}")


def _centre(o: WorldObject) -> tuple[float, float]:
    return ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2)


def _np(scene: Scene, text: str) -> list[WorldObject]:
    pred, _ = _np_filter(text)
    return [o for o in scene.objects if o.kind != "part" and pred(o)]


def _one(scene: Scene, text: str) -> WorldObject | None:
    found = answer(scene, text)
    return scene.get(found[0]) if len(found) == 1 else None


def _rank(objs: list[WorldObject], direction: str) -> list[WorldObject]:
    key = {
        "left": lambda o: _centre(o)[0],
        "right": lambda o: -_centre(o)[0],
        "top": lambda o: _centre(o)[1],
        "bottom": lambda o: -_centre(o)[1],
    }[direction]
    return sorted(objs, key=key)


def _adjacent_people(scene: Scene, a: WorldObject, b: WorldObject) -> bool:
    if a is b:
        return False
    lo, hi = sorted((_centre(a)[0], _centre(b)[0]))
    for p in scene.objects:
        if p.kind == "person" and p is not a and p is not b and lo < _centre(p)[0] < hi:
            return False
    left, right = (a, b) if _centre(a)[0] <= _centre(b)[0] else (b, a)
    return right.box[0] - left.box[2] <= 0.10 * scene.size


def answer(scene: Scene, text: str) -> list[int]:
    """Parse an expression ("the ..." optional, a final "." optional) and return the ids it selects."""
    t = text.strip().rstrip(".")
    t = t[0].lower() + t[1:] if t else t
    if t.startswith("the "):
        t = t[4:]
    return sorted(o.id for o in _eval(scene, t))


def _eval(scene: Scene, t: str) -> list[WorldObject]:
    m = re.match(r"^(?:(left|right) )?(head|torso|arm|leg|hat) of the (.+)$", t)
    if m:
        owners = answer(scene, m[3])
        return [o for o in scene.objects if o.parent in owners and o.category == m[2] and o.side == m[1]]
    if " and the " in t:
        left, right = t.split(" and the ", 1)
        return _np(scene, left) + [o for o in _np(scene, right) if o not in _np(scene, left)]
    for words, test in (
        (" to the left of the ", lambda o, a: o.box[2] <= a.box[0]),
        (" to the right of the ", lambda o, a: o.box[0] >= a.box[2]),
        (" above the ", lambda o, a: o.box[3] <= a.box[1]),
        (" below the ", lambda o, a: o.box[1] >= a.box[3]),
        (" next to the ", lambda o, a: _adjacent_people(scene, o, a)),
        (" held by the ", lambda o, a: o.held_by == a.id),
    ):
        if words in t:
            head, rest = t.split(words, 1)
            anchor = _one(scene, rest)
            if anchor is None:
                return []
            return [o for o in _np(scene, head) if o is not anchor and test(o, anchor)]
    m = re.match(r"^(.+?) who (?:is|are) not holding anything$", t)
    if m:
        return [o for o in _np(scene, m[1]) if o.holding is None]
    m = re.match(r"^(.+?)(?: who (?:is|are))? holding an? (.+)$", t)
    if m:
        item_pred, _ = _np_filter(m[2])
        return [o for o in _np(scene, m[1]) if o.holding is not None and item_pred(scene.get(o.holding))]
    m = re.match(rf"^(.+?) that (?:is|are) not ({_COLOR})$", t)
    if m:
        return [o for o in _np(scene, m[1]) if (o.shirt if o.kind == "person" else o.color) != m[2]]
    m = re.match(r"^(leftmost|rightmost|topmost|bottommost) (.+)$", t)
    if m:
        direction = {"leftmost": "left", "rightmost": "right", "topmost": "top", "bottommost": "bottom"}[m[1]]
        return _rank(_np(scene, m[2]), direction)[:1]
    m = re.match(r"^(second|third|fourth) (.+) from the (left|right|top|bottom)$", t)
    if m:
        k = {"second": 2, "third": 3, "fourth": 4}[m[1]]
        return _rank(_np(scene, m[2]), m[3])[k - 1 : k]
    m = re.match(r"^(largest|smallest) (.+)$", t)
    if m:
        objs = sorted(_np(scene, m[2]), key=lambda o: o.scale, reverse=m[1] == "largest")
        return objs[:1]
    return _np(scene, t)


def is_plural(text: str) -> bool:
    """Whether an expression's head noun is plural (the grammar's signal for several answers)."""
    t = text.strip().rstrip(".")
    t = t[0].lower() + t[1:] if t else t
    t = t[4:] if t.startswith("the ") else t
    t = re.sub(r"^(leftmost|rightmost|topmost|bottommost|largest|smallest|second|third|fourth) ", "", t)
    head = re.split(r" (?:to the|above|below|next to|held by|who|that|holding|from the|in |with|without|and the)", t)[0]
    return head.split()[-1] in {"people", "objects"} | {s + "s" for s in (*SHAPES, *ITEMS)}
