"""ChatRex / RexSeek answers: grounded phrases followed by object-index tokens.

Two spellings of the same structure are read:

- released (ChatRex and RexSeek code): ``<ground>red circle</ground><objects><obj3><obj7></objects>``
- paper (ChatRex, Sec. 3.3):           ``<g>red circle</g><o><obj3><obj7></o>``

Groups may stand on separate lines (detection answers) or inline inside conversation text (grounded
captions). ``<objects>None</objects>`` is RexSeek's explicit "no such object" answer (any letter case):
a group with no indices and no problem. Bare ``<objK>`` tokens outside groups are references (region QA answers:
"<obj0> is holding a cup"); they stay in the plain text, because they are words of the sentence,
and their indices are listed in ``refs``.

``parse`` never raises on model output. Whatever is malformed is reported in ``problems`` and the
rest is kept: unclosed tags, indices >= ``num_boxes`` (dropped), empty groups, repeated indices
(dropped: the public reference parser keeps them; counting a box twice would inflate recall and
precision), text inside an objects block (dropped), stray closing tags. An index of more than
``MAX_INDEX_DIGITS`` digits (leading zeros aside) is out of range whatever ``num_boxes`` is. Parsing takes
time linear in the length of the text, and phrases quoted in problems are cut to ``SHOWN_CHARS`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

Spelling = Literal["released", "paper"]

TAGS: dict[str, dict[str, str]] = {
    "released": {"ground": "<ground>", "/ground": "</ground>", "objects": "<objects>", "/objects": "</objects>"},
    "paper": {"ground": "<g>", "/ground": "</g>", "objects": "<o>", "/objects": "</o>"},
}
NONE_ANSWER = "None"
MAX_INDEX_DIGITS = 9  # no answer points at a billion boxes; a longer index is out of range, never int()'d
SHOWN_CHARS = 60

# ASCII digits only: the object tokens are <obj0>..<objN>; "\d" would also take other scripts' digits.
_TOKEN = re.compile(r"<(/?)(ground|objects|g|o)>|<obj([0-9]+)>")
_KIND = {"ground": "ground", "g": "ground", "objects": "objects", "o": "objects"}


def _shown(s: str) -> str:
    """``s`` for a problem message: repeated problems about one long phrase must not copy it each time."""
    return repr(s if len(s) <= SHOWN_CHARS else s[: SHOWN_CHARS - 3] + "...")


@dataclass(frozen=True)
class GroundedPhrase:
    """One ``phrase -> indices`` group; ``span`` is ``[start, end)`` of the phrase in the plain text."""

    phrase: str
    indices: tuple[int, ...]
    span: tuple[int, int]

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "indices": list(self.indices), "span": list(self.span)}


@dataclass(frozen=True)
class ChatRexAnswer:
    text: str
    groups: tuple[GroundedPhrase, ...] = ()
    refs: tuple[int, ...] = ()
    problems: tuple[str, ...] = field(default=(), compare=False)

    @property
    def indices(self) -> list[int]:
        """Every index the answer points at, groups first then bare references, without repeats."""
        seen: dict[int, None] = {}
        for g in self.groups:
            seen.update(dict.fromkeys(g.indices))
        seen.update(dict.fromkeys(self.refs))
        return list(seen)

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "groups": [g.to_json() for g in self.groups],
            "refs": list(self.refs),
            "problems": list(self.problems),
        }


def parse(text: str, num_boxes: int | None = None) -> ChatRexAnswer:
    """Parse a ChatRex answer. ``num_boxes`` (the number of input boxes) bounds valid indices."""
    if not isinstance(text, str):
        return ChatRexAnswer("", problems=(f"expected text, got {type(text).__name__}",))
    plain: list[str] = []
    plain_len = 0
    groups: list[GroundedPhrase] = []
    refs: list[int] = []
    problems: list[str] = []

    state = "text"  # "text" | "phrase" | "after_phrase" | "objects"
    phrase_start = 0
    phrase_piece = 0  # index in ``plain`` where the open phrase starts: join its pieces, not all the text
    phrase_spelling = ""
    pending: tuple[str, tuple[int, int]] | None = None  # closed phrase awaiting its objects block
    indices: list[int] = []
    saw_none = False
    junk: list[str] = []

    def read_index(digits: str, where: str) -> int | None:
        """The index ``digits`` spell, or None (reported) when it is out of range."""
        significant = digits.lstrip("0") or "0"
        if len(significant) > MAX_INDEX_DIGITS:
            shown = significant if len(significant) <= 20 else significant[:17] + "..."
            problems.append(f"index {shown} ({len(significant)} digits) in {where} is out of range")
            return None
        k = int(significant)
        if num_boxes is not None and k >= num_boxes:
            problems.append(f"index {k} in {where} is out of range (only {num_boxes} boxes)")
            return None
        return k

    def open_phrase_text() -> str:
        return "".join(plain[phrase_piece:])

    def emit_plain(s: str) -> None:
        nonlocal plain_len
        plain.append(s)
        plain_len += len(s)

    def close_pending_without_objects() -> None:
        nonlocal pending
        if pending is not None:
            phrase, span = pending
            problems.append(f"phrase {_shown(phrase)} has no objects block")
            groups.append(GroundedPhrase(phrase, (), span))
            pending = None

    def finish_objects(closed: bool) -> None:
        nonlocal pending, indices, saw_none, junk
        phrase, span = pending if pending is not None else ("", (plain_len, plain_len))
        if pending is None:
            problems.append(f"objects block without a grounded phrase at character {plain_len}")
        if not closed:
            problems.append(f"unclosed objects block for phrase {_shown(phrase)}")
        if junk:
            ignored = _shown("".join(junk).strip())
            problems.append(f"text {ignored} inside the objects block of {_shown(phrase)} was ignored")
        unique: dict[int, None] = {}  # ordered, and a membership test in constant time
        for k in indices:
            if k in unique:
                problems.append(f"index {k} repeated in the objects of {_shown(phrase)}")
            else:
                unique[k] = None
        if not unique and not saw_none:
            problems.append(f"empty objects block for phrase {_shown(phrase)}")
        groups.append(GroundedPhrase(phrase, tuple(unique), span))
        pending, indices, saw_none, junk = None, [], False, []

    pos = 0
    for m in _TOKEN.finditer(text):
        between = text[pos : m.start()]
        pos = m.end()
        if between:
            if state == "objects":
                if between.strip().lower() == NONE_ANSWER.lower() and not indices:
                    saw_none = True
                elif between.strip(" \t\n,;"):
                    junk.append(between)
            else:
                if state == "after_phrase" and between.strip():
                    close_pending_without_objects()
                    state = "text"
                emit_plain(between)
        closing, tag, number = m.group(1), m.group(2), m.group(3)
        if number is not None:
            if state == "objects":
                k = read_index(number, "an objects block")
                if k is not None:
                    indices.append(k)
                continue
            if state == "after_phrase":
                close_pending_without_objects()
                state = "text"
            emit_plain(m.group(0))
            k = read_index(number, "a bare reference")
            if k is not None:
                refs.append(k)
            continue
        kind = _KIND[tag]
        if kind == "ground" and not closing:
            if state == "objects":
                finish_objects(closed=False)
            elif state == "phrase":
                problems.append(f"nested {m.group(0)} inside a phrase was ignored")
                continue
            elif state == "after_phrase":
                close_pending_without_objects()
            state, phrase_start, phrase_piece, phrase_spelling = "phrase", plain_len, len(plain), tag
        elif kind == "ground":
            if state != "phrase":
                problems.append(f"stray {m.group(0)} at character {m.start()} was ignored")
                continue
            if (tag == "g") != (phrase_spelling == "g"):
                problems.append(f"{m.group(0)} closes a phrase opened with <{phrase_spelling}>")
            pending = (open_phrase_text(), (phrase_start, plain_len))
            state = "after_phrase"
        elif not closing:
            if state == "objects":
                # The paper prints "<o><objm>...<objn><o>": a second <o> reads as the closing tag.
                problems.append(f"objects block closed by {m.group(0)} instead of its closing tag")
                finish_objects(closed=True)
                state = "text"
                continue
            if state == "phrase":
                problems.append(f"unclosed phrase before {m.group(0)} at character {m.start()}")
                pending = (open_phrase_text(), (phrase_start, plain_len))
            state = "objects"
        else:
            if state != "objects":
                problems.append(f"stray {m.group(0)} at character {m.start()} was ignored")
                continue
            finish_objects(closed=True)
            state = "text"

    tail = text[pos:]
    if state == "objects":
        if tail.strip().lower() == NONE_ANSWER.lower() and not indices:
            saw_none = True
        elif tail.strip(" \t\n,;"):
            junk.append(tail)
        finish_objects(closed=False)
    else:
        if state == "after_phrase" and tail.strip():
            close_pending_without_objects()
        emit_plain(tail)
        if state == "phrase":
            problems.append(f"unclosed phrase starting at character {phrase_start}")
            groups.append(GroundedPhrase(open_phrase_text(), (), (phrase_start, plain_len)))
        elif state == "after_phrase":
            close_pending_without_objects()
    return ChatRexAnswer("".join(plain), tuple(groups), tuple(refs), tuple(problems))


def _objects_block(indices: Iterable[int], tags: dict[str, str]) -> str:
    body = "".join(f"<obj{int(k)}>" for k in indices) or NONE_ANSWER
    return f"{tags['objects']}{body}{tags['/objects']}"


def render(text: str, groups: Sequence[GroundedPhrase], spelling: Spelling = "released") -> str:
    """Write plain text plus groups back into ChatRex markup: ``parse(render(t, g)).groups == g``.

    Each group's ``span`` must select its ``phrase`` in ``text``; spans must not overlap. A group with
    no indices renders as ``<objects>None</objects>`` (a rejection).
    """
    tags = TAGS[spelling]
    out: list[str] = []
    pos = 0
    for g in sorted(groups, key=lambda g: g.span):
        start, end = g.span
        if not (pos <= start <= end <= len(text)):
            raise ValueError(f"group span {g.span} overlaps another group or leaves the text (length {len(text)})")
        if text[start:end] != g.phrase:
            raise ValueError(f"span {g.span} selects {text[start:end]!r}, not the phrase {g.phrase!r}")
        if any(k < 0 for k in g.indices):
            raise ValueError(f"negative index in {g.indices}")
        out.append(text[pos:start])
        out.append(f"{tags['ground']}{g.phrase}{tags['/ground']}{_objects_block(g.indices, tags)}")
        pos = end
    out.append(text[pos:])
    return "".join(out)


def render_groups(pairs: Iterable[tuple[str, Sequence[int]]], spelling: Spelling = "released", sep: str = "\n") -> str:
    """A detection-style answer: one ``phrase -> indices`` group per line, as ChatRex prints them."""
    tags = TAGS[spelling]
    return sep.join(
        f"{tags['ground']}{phrase}{tags['/ground']}{_objects_block(indices, tags)}" for phrase, indices in pairs
    )
