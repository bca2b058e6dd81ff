"""REF-VLM's Triplet-Based Referring Paradigm (TRP): concept, decoding unit, reference tokens.

An answer names a concept in ``<Phrase>..</Phrase>`` and follows it with one or more unit groups,
each a decoding type and the numbered ``<REF>`` tokens whose hidden states a decoder turns into
targets (paper Sec. III-A; the released VT-PLUG code writes groups in parentheses)::

    <Phrase>circles</Phrase>(<Unit>box</Unit>[0]<REF>[1]<REF>)
    <Phrase>person</Phrase>(<Unit>box, keypoint</Unit>[0]<REF>)
    <Phrase><Phrase>dog</Phrase> in <Phrase>park</Phrase></Phrase>(<Unit>mask</Unit>[0]<REF>)

The released system also uses a visual-decoding chain of thought before the answer, and a block of
visual representation tokens on the input side::

    <Task>
    Unit decode (True). Class name, target unit and number:
    - Name: circles Unit: <Unit>box</Unit> Num: 2
    - Name: person Unit: box, keypoint Num: 1
    </Task>
    <v><VRT><VRT>...</v>

Plan entries come with the unit in ``<Unit>`` tags or without (the released code has both forms);
``parse`` reads either, ``render_plan`` writes the tagged one.

``parse`` returns the plain text (all markup removed), one ``Triplet`` per phrase with its span, its
unit groups and, for each ``<REF>``, its ordinal among all ``<REF>`` tokens of the text. The ordinal
is what routes hidden states: the i-th ``<REF>`` id in the token sequence belongs to ordinal i (see
``ref_token_positions``). ``parse`` never raises on model output; it reports problems.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

PHRASE_OPEN, PHRASE_CLOSE = "<Phrase>", "</Phrase>"
UNIT_OPEN, UNIT_CLOSE = "<Unit>", "</Unit>"
MAX_NUMBER_DIGITS = 9  # a [k] label or a plan's Num: longer than this is a problem, not a number
SHOWN_CHARS = 60  # of model text quoted in a problem: a junk answer must not make problems as long as itself


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def _unclosed(group: dict) -> str | None:
    """The problem of a parenthesised unit group that text interrupts before its ')'."""
    return f"unit group {_shown(str(group['units']))} was not closed with ')'" if group["paren"] else None


TASK_OPEN, TASK_CLOSE = "<Task>", "</Task>"
VRT_OPEN, VRT_CLOSE = "<v>", "</v>"
REF, VRT = "<REF>", "<VRT>"
SPECIAL_TOKENS = (
    TASK_OPEN,
    TASK_CLOSE,
    UNIT_OPEN,
    UNIT_CLOSE,
    VRT_OPEN,
    VRT_CLOSE,
    PHRASE_OPEN,
    PHRASE_CLOSE,
    VRT,
    REF,
)
KNOWN_UNITS = ("box", "mask", "keypoint", "point", "depth")

_TOKEN = re.compile(
    r"(?P<popen><Phrase>)|(?P<pclose></Phrase>)|(?P<gopen>\(\s*<Unit>)|(?P<uopen><Unit>)|(?P<uclose></Unit>)"
    r"|(?P<label>\[(?P<k>\d+)\])|(?P<ref><REF>)|(?P<gclose>\))|(?P<topen><Task>)|(?P<tclose></Task>)"
    r"|(?P<vopen><v>)|(?P<vclose></v>)|(?P<vrt><VRT>)"
)
# Where a plan entry starts; the rest of the entry is cut with str methods (see _parse_plan_entry).
_PLAN_ENTRY = re.compile(r"-\s*Name:")  # applied to one line at a time
_PLAN_NUM = re.compile(r"\s*(\d+)")


@dataclass(frozen=True)
class UnitGroup:
    """``(<Unit>box</Unit>[0]<REF>[1]<REF>)``: units, the ``[k]`` labels and the ``<REF>`` ordinals."""

    units: tuple[str, ...]
    labels: tuple[int, ...]
    ref_ordinals: tuple[int, ...] = field(compare=False)
    ref_chars: tuple[int, ...] = field(default=(), compare=False)  # character offsets in the raw text


@dataclass(frozen=True)
class Triplet:
    phrase: str
    span: tuple[int, int]
    groups: tuple[UnitGroup, ...] = ()
    parent: int | None = None  # index of the enclosing phrase for nested phrases

    @property
    def ref_ordinals(self) -> list[int]:
        return [o for g in self.groups for o in g.ref_ordinals]

    @property
    def units(self) -> list[str]:
        return [u for g in self.groups for u in g.units]


@dataclass(frozen=True)
class PlanEntry:
    name: str
    units: tuple[str, ...]
    num: int


@dataclass(frozen=True)
class TaskPlan:
    """The ``<Task>`` chain of thought: whether units are decoded and, if so, what and how many."""

    decode: bool
    entries: tuple[PlanEntry, ...] = ()


@dataclass(frozen=True)
class RefVlmAnswer:
    text: str
    triplets: tuple[Triplet, ...] = ()
    task: TaskPlan | None = None
    vrt_count: int = 0
    num_refs: int = field(default=0, compare=False)
    problems: tuple[str, ...] = field(default=(), compare=False)

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "triplets": [
                {
                    "phrase": t.phrase,
                    "span": list(t.span),
                    "parent": t.parent,
                    "groups": [
                        {"units": list(g.units), "labels": list(g.labels), "ref_ordinals": list(g.ref_ordinals)}
                        for g in t.groups
                    ],
                }
                for t in self.triplets
            ],
            "task": None
            if self.task is None
            else {
                "decode": self.task.decode,
                "entries": [{"name": e.name, "units": list(e.units), "num": e.num} for e in self.task.entries],
            },
            "vrt_count": self.vrt_count,
            "num_refs": self.num_refs,
            "problems": list(self.problems),
        }


def _split_units(raw: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in raw.split(",") if u.strip())


def _parse_plan_entry(entry: str) -> PlanEntry | None:
    """``circles Unit: <Unit>box</Unit> Num: 2`` or, as the released code writes it, ``circles Unit: box Num: 2``.

    Cut at the last ``Num:`` and the last ``Unit:`` before it with ``rfind`` rather than with lazy regex
    groups: those retry at every position and made a long junk line take minutes.
    """
    k = entry.rfind("Num:")
    if k < 0:
        return None
    num = _PLAN_NUM.match(entry, k + len("Num:"))
    u = entry.rfind("Unit:", 0, k)
    if num is None or u <= 0 or not entry[u - 1].isspace():  # the name ends in whitespace, as before
        return None
    units = entry[u + len("Unit:") : k].strip()
    if units.startswith(UNIT_OPEN) and units.endswith(UNIT_CLOSE):
        units = units[len(UNIT_OPEN) : -len(UNIT_CLOSE)]
    if UNIT_OPEN in units or UNIT_CLOSE in units or len(num[1].lstrip("0")) > MAX_NUMBER_DIGITS:
        return None
    return PlanEntry(entry[:u].strip(), _split_units(units), int(num[1]))


def _parse_plan(body: str, problems: list[str]) -> TaskPlan:
    decode = "Unit decode (True)" in body
    if not decode and "Unit decode (False)" not in body:
        problems.append("task block does not say 'Unit decode (True)' or 'Unit decode (False)'")
    entries: list[PlanEntry] = []
    for line in body.split("\n"):
        # an entry runs to the next "- Name:" on its line or to the line's end
        spans = [m.span() for m in _PLAN_ENTRY.finditer(line)]
        for i, (_, start) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else len(line)
            entry = _parse_plan_entry(line[start:end])
            if entry is None:
                shown = line[start:end].strip()
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                problems.append(f"task plan entry {'- Name: ' + shown!r} was not understood")
            else:
                entries.append(entry)
    if decode and not entries:
        problems.append("task block says units are decoded but lists none")
    return TaskPlan(decode, tuple(entries))


def parse(text: str) -> RefVlmAnswer:
    if not isinstance(text, str):
        return RefVlmAnswer("", problems=(f"expected text, got {type(text).__name__}",))
    plain: list[str] = []
    plain_len = 0
    problems: list[str] = []
    triplets: list[dict] = []
    stack: list[int] = []  # indices into triplets of open phrases
    last_closed: int | None = None
    text_since_close = False
    num_refs = 0
    vrt_count = 0
    task: TaskPlan | None = None

    # unit-group state
    group: dict | None = None  # {"units", "labels", "ords", "chars", "paren", "owner", "pending_label"}
    in_unit = False
    unit_chars: list[str] = []
    mode = "text"  # "text" | "task" | "vrt"
    mode_start = 0

    def emit(s: str) -> None:
        nonlocal plain_len, text_since_close
        if not s:
            return
        plain.append(s)
        plain_len += len(s)
        if s.strip():
            text_since_close = True

    def close_group(reason: str | None = None) -> None:
        nonlocal group
        if group is None:
            return
        if reason:
            problems.append(reason)
        if group["pending_label"] is not None:
            problems.append(f"label [{group['pending_label']}] is not followed by <REF>")
        if not group["ords"]:
            problems.append(f"unit group {_shown(str(group['units']))} has no <REF> tokens")
        ug = UnitGroup(tuple(group["units"]), tuple(group["labels"]), tuple(group["ords"]), tuple(group["chars"]))
        owner = group["owner"]
        if owner is None:
            problems.append(f"unit group {_shown(str(ug.units))} does not follow a phrase")
        else:
            triplets[owner]["groups"].append(ug)
        group = None

    pos = 0
    for m in _TOKEN.finditer(text):
        between = text[pos : m.start()]
        kind = m.lastgroup if m.lastgroup != "k" else "label"
        if mode == "task":
            if kind == "tclose":
                task = _parse_plan(text[mode_start : m.start()], problems)
                mode = "text"
                pos = m.end() + (text.startswith("\n", m.end()))  # the block owns its line break
            continue  # everything up to </Task> belongs to the plan
        if mode == "vrt":
            if between.strip():
                problems.append(f"text {_shown(between.strip())!r} inside the <v> block was ignored")
            pos = m.end()
            if kind == "vrt":
                vrt_count += 1
            elif kind == "vclose":
                mode = "text"
                pos += text.startswith("\n", pos)  # the block owns its line break
            else:
                problems.append(f"{m.group(0)} inside the <v> block was ignored")
            continue
        pos = m.end()
        if in_unit:
            if kind == "uclose":
                in_unit = False
                assert group is not None
                group["units"] = list(_split_units("".join(unit_chars) + between))
                unknown = [u for u in group["units"] if u not in KNOWN_UNITS]
                if unknown:
                    problems.append(f"unknown unit {_shown(', '.join(unknown))}")
                if not group["units"]:
                    problems.append("empty <Unit></Unit>")
                unit_chars.clear()
            else:
                unit_chars.append(between + m.group(0))
            continue
        if group is not None:
            if between.strip():
                close_group(_unclosed(group))
                emit(between)
            elif kind == "label":
                if group["pending_label"] is not None:
                    problems.append(f"label [{group['pending_label']}] is not followed by <REF>")
                digits = m.group("k")
                if len(digits.lstrip("0")) > MAX_NUMBER_DIGITS:  # never int()'d: Python refuses 4,300 digits
                    problems.append(f"label [{digits[:12]}...] has {len(digits)} digits; no answer has that many")
                    continue
                group["pending_label"] = int(digits)
                continue
            elif kind == "ref":
                group["ords"].append(num_refs)
                group["chars"].append(m.start())
                num_refs += 1
                if group["pending_label"] is None:
                    problems.append(f"<REF> at character {m.start()} has no [k] label")
                    group["labels"].append(len(group["labels"]))
                else:
                    group["labels"].append(group["pending_label"])
                group["pending_label"] = None
                continue
            elif kind == "gclose":
                if not group["paren"]:
                    # a ')' after an unparenthesised group is ordinary text
                    close_group()
                    emit(m.group(0))
                    continue
                close_group()
                continue
            else:
                close_group(_unclosed(group))
        else:
            emit(between)

        if kind == "popen":
            stack.append(len(triplets))
            triplets.append(
                {"start": plain_len, "end": None, "groups": [], "parent": stack[-2] if len(stack) > 1 else None}
            )
        elif kind == "pclose":
            if not stack:
                problems.append(f"stray </Phrase> at character {m.start()} was ignored")
                continue
            idx = stack.pop()
            triplets[idx]["end"] = plain_len
            last_closed, text_since_close = idx, False
        elif kind in ("gopen", "uopen"):
            owner = last_closed if not text_since_close else None
            group = {
                "units": [],
                "labels": [],
                "ords": [],
                "chars": [],
                "paren": kind == "gopen",
                "owner": owner,
                "pending_label": None,
            }
            in_unit = True
        elif kind == "ref":
            problems.append(f"stray <REF> at character {m.start()} outside a unit group")
            num_refs += 1
        elif kind == "topen":
            mode, mode_start = "task", m.end()
        elif kind == "vopen":
            mode = "vrt"
        elif kind == "vrt":
            vrt_count += 1
            problems.append("<VRT> outside a <v> block")
        elif kind in ("tclose", "vclose", "uclose"):
            problems.append(f"stray {m.group(0)} at character {m.start()} was ignored")
        else:  # "label" or "gclose" in plain text: ordinary characters
            emit(m.group(0))
            if kind == "label":
                text_since_close = True

    tail = text[pos:]
    if mode == "task":
        problems.append("unclosed <Task> block")
        task = _parse_plan(text[mode_start:], problems)
    elif mode == "vrt":
        problems.append("unclosed <v> block")
    elif in_unit:
        problems.append("unclosed <Unit>")
        assert group is not None
        group["units"] = list(_split_units("".join(unit_chars) + tail))
        close_group()
    else:
        if group is not None:
            if tail.strip():
                close_group(_unclosed(group))
            else:
                close_group(f"unclosed unit group {group['units']}" if group["paren"] else None)
        emit(tail)
    for idx in stack:
        problems.append("unclosed <Phrase>")
        triplets[idx]["end"] = plain_len
    full = "".join(plain)
    out = tuple(
        Triplet(full[t["start"] : t["end"]], (t["start"], t["end"]), tuple(t["groups"]), t["parent"]) for t in triplets
    )
    if task is not None and task.decode:
        counts = {t.phrase: len(t.ref_ordinals) for t in out if t.groups}
        for entry in task.entries:
            if entry.name in counts and counts[entry.name] != entry.num:
                name, found = _shown(entry.name), counts[entry.name]
                problems.append(f"task plan says {entry.num} targets for {name!r}, the answer has {found}")
    return RefVlmAnswer(full, out, task, vrt_count, num_refs, tuple(problems))


def render_group(units: Sequence[str], count: int) -> str:
    """``(<Unit>box</Unit>[0]<REF>[1]<REF>)`` for ``count`` targets."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if not units:
        raise ValueError("a unit group needs at least one unit")
    refs = "".join(f"[{k}]{REF}" for k in range(count))
    return f"({UNIT_OPEN}{', '.join(units)}{UNIT_CLOSE}{refs})"


def render_plan(plan: TaskPlan) -> str:
    if not plan.decode:
        return f"{TASK_OPEN}\nUnit decode (False).\n{TASK_CLOSE}\n"
    lines = "".join(
        f"- Name: {e.name} Unit: {UNIT_OPEN}{', '.join(e.units)}{UNIT_CLOSE} Num: {e.num}\n" for e in plan.entries
    )
    return f"{TASK_OPEN}\nUnit decode (True). Class name, target unit and number:\n{lines}{TASK_CLOSE}\n"


def render_vrt(count: int) -> str:
    return f"{VRT_OPEN}{VRT * count}{VRT_CLOSE}\n"


def render(text: str, triplets: Sequence[Triplet], task: TaskPlan | None = None) -> str:
    """Write plain text and (possibly nested) triplets back into TRP markup.

    Each triplet's span must select its phrase in ``text``; spans nest or are disjoint. Unit groups
    are written right after the phrase's closing tag with labels ``[0]..[n-1]``.
    """
    events: list[tuple[int, int, int, str]] = []  # (position, order, tiebreak, markup)
    for t in triplets:
        start, end = t.span
        if not (0 <= start <= end <= len(text)) or text[start:end] != t.phrase:
            raise ValueError(f"span {t.span} does not select the phrase {t.phrase!r}")
        groups = "".join(render_group(g.units, len(g.labels)) for g in t.groups)
        if start == end:
            events.append((start, 1, 0, PHRASE_OPEN + PHRASE_CLOSE + groups))
            continue
        # at one position: closings (inner first), then empty phrases, then openings (outer first)
        events.append((start, 2, -end, PHRASE_OPEN))
        events.append((end, 0, -start, PHRASE_CLOSE + groups))
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    out: list[str] = [render_plan(task)] if task is not None else []
    pos = 0
    for position, _, _, markup in events:
        out.append(text[pos:position])
        out.append(markup)
        pos = position
    out.append(text[pos:])
    return "".join(out)


def ref_token_positions(input_ids: Sequence[int], ref_token_id: int, answer: RefVlmAnswer) -> list[list[int]]:
    """For each triplet, the positions in ``input_ids`` of its ``<REF>`` tokens (routing for decoders).

    The i-th occurrence of ``ref_token_id`` is ordinal i. Raises ``ValueError`` if the ids hold a
    different number of ``<REF>`` tokens than the parsed text: the two do not belong together.
    """
    positions = [p for p, t in enumerate(input_ids) if int(t) == ref_token_id]
    if len(positions) != answer.num_refs:
        raise ValueError(f"token ids hold {len(positions)} <REF> tokens, the parsed text {answer.num_refs}")
    return [[positions[o] for o in t.ref_ordinals] for t in answer.triplets]
