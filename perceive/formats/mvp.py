"""MVP-LM's instructions and its "thinking-then-perceiving" response (mvp-lm.txt, Sec. 3.3).

Each sample is a task description, an instruction and a response:

- word-based perception: the description "Please identify all objects according to the given phrase
  list. This is all the candidate phrases." and the categories joined by ", " ("apple, banana,
  orange"); each word's character span is kept so its output embeddings can be average-pooled;
- sentence-based perception: "Please identify the target according to the following instruction."
  and the referring expression itself;
- the response: ``{image caption}. The perception result is <PER>``; the hidden state of ``<PER>``
  becomes the decoder's query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

PER = "<PER>"
WORD_TASK = "Please identify all objects according to the given phrase list. This is all the candidate phrases."
SENTENCE_TASK = "Please identify the target according to the following instruction."
RESULT_LEAD = "The perception result is"
Kind = Literal["word", "sentence"]


@dataclass(frozen=True)
class Instruction:
    kind: Kind
    categories: tuple[str, ...] = ()  # word-based
    spans: tuple[tuple[int, int], ...] = ()  # of each category inside ``text``
    sentence: str = ""  # sentence-based
    text: str = ""  # the instruction as written after the task description
    problems: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Response:
    caption: str
    per_offset: int | None  # character offset of <PER>, None when missing
    problems: tuple[str, ...] = field(default=(), compare=False)


def word_instruction(categories: Sequence[str]) -> Instruction:
    cats = tuple(c.strip() for c in categories)
    if not cats or any(not c for c in cats):
        raise ValueError(f"word-based instructions need non-empty category names, got {list(categories)}")
    if any("," in c for c in cats):
        raise ValueError(f"category names may not contain ',' (it separates them): {list(cats)}")
    spans, pos = [], 0
    for c in cats:
        spans.append((pos, pos + len(c)))
        pos += len(c) + 2
    return Instruction("word", cats, tuple(spans), text=", ".join(cats))


def sentence_instruction(sentence: str) -> Instruction:
    s = sentence.strip()
    if not s:
        raise ValueError("sentence-based instructions need a non-empty expression")
    return Instruction("sentence", sentence=s, text=s)


def render_prompt(instruction: Instruction) -> str:
    """The full user turn: task description, a space, then the instruction."""
    lead = WORD_TASK if instruction.kind == "word" else SENTENCE_TASK
    return f"{lead} {instruction.text}"


def parse_prompt(text: str) -> Instruction:
    """Recover the instruction from a user turn; never raises on odd input."""
    if not isinstance(text, str):
        return Instruction("sentence", problems=(f"expected text, got {type(text).__name__}",))
    stripped = text.strip()
    for lead, kind in ((WORD_TASK, "word"), (SENTENCE_TASK, "sentence")):
        if stripped.startswith(lead):
            body = stripped[len(lead) :].strip()
            if kind == "sentence":
                return Instruction(
                    "sentence", sentence=body, text=body, problems=() if body else ("empty instruction",)
                )
            body = body.rstrip(".").strip()
            cats, spans, pos = [], [], 0
            for piece in body.split(","):
                start = pos + len(piece) - len(piece.lstrip())
                name = piece.strip()
                if name:
                    cats.append(name)
                    spans.append((start, start + len(name)))
                pos += len(piece) + 1
            return Instruction(
                "word",
                tuple(cats),
                tuple(spans),
                text=body,
                problems=() if cats else ("no categories in the phrase list",),
            )
    return Instruction(
        "sentence",
        sentence=stripped,
        text=stripped,
        problems=("no MVP-LM task description; read as a sentence instruction",),
    )


def render_response(caption: str) -> str:
    caption = caption.strip().rstrip(".")
    return f"{caption}. {RESULT_LEAD} {PER}" if caption else f"{RESULT_LEAD} {PER}"


def parse_response(text: str) -> Response:
    if not isinstance(text, str):
        return Response("", None, (f"expected text, got {type(text).__name__}",))
    problems: list[str] = []
    offset = text.find(PER)
    if offset < 0:
        problems.append("no <PER> token in the response")
    elif text.count(PER) > 1:
        problems.append(f"{text.count(PER)} <PER> tokens; the first is used")
    lead_at = text.find(RESULT_LEAD)
    if lead_at < 0:
        problems.append(f"missing {RESULT_LEAD!r}")
        caption = text[: offset if offset >= 0 else len(text)]
    else:
        caption = text[:lead_at]
    caption = caption.strip().rstrip(".").strip()
    return Response(caption, offset if offset >= 0 else None, tuple(problems))
