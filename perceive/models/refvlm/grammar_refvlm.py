"""The grammar of REF-VLM's TRP answers, for ``perceive.models.generation.generate``::

    answer   plan | text
    plan     <Task> Unit decode ( False ) . </Task> words*                  (nothing to decode; REG's text)
           | <Task> Unit decode ( True ) . Class name, target unit and number: entry+ </Task> triplet+
    entry    - Name: word+ Unit: <Unit> unit (, unit)* </Unit> Num: N        (N >= 1)
    triplet  <Phrase> name </Phrase> ( <Unit> units </Unit> [0] <REF> ... [N-1] <REF> )
    text     (word | <Phrase> word+ </Phrase> ( <Unit> unit (, unit)* </Unit> [0] <REF> ([k] <REF>)* ))*

The model chooses True or False, the names, units and counts of a plan; the triplets after ``</Task>`` are
written from the plan (one per entry, its ``[k]`` labels consecutive). Without a plan (a grounded caption) the model
chooses its words, phrases, units and how many ``<REF>`` s each group has. Every fixed piece is ``TrpPieces``' ids,
so the answers parse under ``perceive.formats.refvlm`` and close whatever they opened within the token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from perceive.models.generation import Grammar
from perceive.models.refvlm.processing_refvlm import TrpPieces

# a state's mode; "plan" modes build the <Task> plan's entries, "group" modes a caption's unit group
MODES = ("start", "decide", "name_first", "name", "plan_unit", "plan_unit_more", "num", "entry_next", "end", "text",
         "plain", "phrase_first", "phrase", "group_unit", "group_unit_more", "refs")  # fmt: skip
FREE_WORD_MODES = ("start", "text", "plain", "name_first", "name", "phrase_first", "phrase")


@dataclass(frozen=True)
class Part:
    """A piece of the answer so far: ``kind`` ``"text"`` (word ids) or ``"phrase"`` (name ids, unit names, count)."""

    kind: str
    ids: tuple[int, ...] = ()
    units: tuple[str, ...] = ()
    count: int = 0


@dataclass(frozen=True)
class TrpState:
    mode: str
    queue: tuple[int, ...] = ()  # fixed tokens that come next
    decode: bool | None = None  # the plan's choice; None: no plan
    entries: tuple[Part, ...] = ()  # the plan's finished entries
    parts: tuple[Part, ...] = ()  # the answer's text and phrases, in order
    name: tuple[int, ...] = ()  # the entry or phrase being written
    units: tuple[str, ...] = ()
    count: int = 0  # <REF>s of the open caption group


class TrpGrammar(Grammar):
    """Token-id masks of the TRP grammar's states for one tokenizer (``TrpPieces``) and vocabulary size."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.p = p = TrpPieces(tokenizer)
        self.vocab_size = vocab_size
        self.eos = p.eos
        self.label_open = p.label(0)[0]
        structural = {p.task_open, p.task_close, p.unit_open, p.unit_close, p.phrase_open, p.phrase_close, p.ref,
                      p.group_open, p.group_close, self.label_open, *p.label(0)[-1:], p.eos}  # fmt: skip
        special = {int(i) for i in tokenizer.all_special_ids} | {int(i) for i in tokenizer.added_tokens_decoder}
        self.words = torch.zeros(vocab_size, dtype=torch.bool)
        self.words[: len(tokenizer)] = True  # a pretrained model's rows past its tokenizer are padding, no word
        self.words[[i for i in structural | special if 0 <= i < vocab_size]] = False
        self.name_words = self.words.clone()
        self.name_words[p.unit_lead[0]] = False  # "Unit:" ends a plan entry's name
        self.label_len = len(p.label(0))

    # -- lengths ---------------------------------------------------------------------------------------------------
    def triplet_len(self, name_len: int, n_units: int, count: int) -> int:
        return 4 + name_len + 2 * n_units + count * (self.label_len + 1) + 1

    def _entry_tail(self) -> int:
        """From inside an entry's unit list: the close, ``Num:`` and the number."""
        return 1 + len(self.p.num_lead) + 1

    def tokens_to_finish(self, s: TrpState) -> int:
        p = self.p
        done = sum(self.triplet_len(len(e.ids), len(e.units), e.count) for e in s.entries)
        plan_end = 1 + done + 1  # </Task>, the finished entries' triplets, EOS
        rest = {
            "start": 1, "text": 1, "plain": 1, "end": 1,
            "decide": 1 + len(p.false_tail) + 1 + 1,
            "name_first": 1 + len(p.unit_lead) + 2 + self._entry_tail() + plan_end + self.triplet_len(1, 1, 1),
            "name": len(p.unit_lead) + 2 + self._entry_tail() + plan_end + self.triplet_len(len(s.name), 1, 1),
            "plan_unit": 1 + self._entry_tail() + plan_end + self.triplet_len(len(s.name), len(s.units) + 1, 1),
            "plan_unit_more": self._entry_tail() + plan_end + self.triplet_len(len(s.name), len(s.units), 1),
            "num": 1 + plan_end + self.triplet_len(len(s.name), len(s.units), 1),
            "entry_next": plan_end,
            "phrase_first": 1 + 1 + 2 + 2 + self.label_len + 1 + 1 + 1,
            "phrase": 1 + 2 + 2 + self.label_len + 1 + 1 + 1,
            "group_unit": 2 + self.label_len + 1 + 1 + 1,
            "group_unit_more": 1 + self.label_len + 1 + 1 + 1,
            "refs": 1 + 1,
        }[s.mode]  # fmt: skip
        return len(s.queue) + rest

    # -- the automaton ---------------------------------------------------------------------------------------------
    def start(self, **_) -> TrpState:
        return TrpState("start")

    def _candidates(self, s: TrpState) -> torch.Tensor:
        p = self.p
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if s.queue:
            m[s.queue[0]] = True
            return m
        mode = s.mode
        if mode in ("start", "text", "plain"):
            m |= self.words
            m[p.eos] = True
            if mode != "plain":
                m[p.phrase_open] = True
            if mode == "start":
                m[p.task_open] = True
        elif mode == "decide":
            m[[p.true, p.false]] = True
        elif mode in ("name_first", "phrase_first"):
            m |= self.name_words if mode == "name_first" else self.words
        elif mode == "name":
            m |= self.name_words
            m[p.unit_lead[0]] = True
        elif mode == "phrase":
            m |= self.words
            m[p.phrase_close] = True
        elif mode in ("plan_unit", "group_unit"):
            m[[t for u, t in p.units.items() if u not in s.units]] = True
        elif mode in ("plan_unit_more", "group_unit_more"):
            m[p.unit_close] = True
            if len(s.units) < len(p.units):
                m[p.comma] = True
        elif mode == "num":
            m[p.numbers[1:]] = True
        elif mode == "entry_next":
            m[[p.entry[0], p.task_close]] = True
        elif mode == "end":
            m[p.eos] = True
        elif mode == "refs":
            m[[self.label_open, p.group_close]] = True
        return m

    def allowed(self, s: TrpState, budget: int = 1 << 30) -> torch.Tensor:
        m = self._candidates(s)
        if s.queue or s.mode == "end":
            return m
        # a token is allowed when a well-formed ending still fits after it; free words of a mode share one effect
        free = m & self.name_words if s.mode in FREE_WORD_MODES else torch.zeros_like(m)
        if bool(free.any()) and 1 + self.tokens_to_finish(self.advance(s, int(free.nonzero()[0]))) > budget:
            m &= ~free
        for tok in (m & ~free).nonzero().flatten().tolist():
            if tok != self.eos and 1 + self.tokens_to_finish(self.advance(s, tok)) > budget:
                m[tok] = False
        return m

    def finish(self, s: TrpState) -> torch.Tensor:
        p = self.p
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if s.queue:
            m[s.queue[0]] = True
            return m
        nxt = {"start": p.eos, "text": p.eos, "plain": p.eos, "end": p.eos, "decide": p.false, "name": p.unit_lead[0],
               "phrase": p.phrase_close, "plan_unit_more": p.unit_close, "group_unit_more": p.unit_close,
               "num": p.numbers[1], "entry_next": p.task_close, "refs": p.group_close}.get(s.mode)  # fmt: skip
        if nxt is not None:
            m[nxt] = True
        elif s.mode in ("plan_unit", "group_unit"):
            m[next(t for u, t in p.units.items() if u not in s.units)] = True
        else:  # a name or phrase needs its first word: any
            m |= self.name_words if s.mode == "name_first" else self.words
        return m

    def advance(self, s: TrpState, token: int) -> TrpState:
        p = self.p
        if s.queue:
            return replace(s, queue=s.queue[1:])
        mode = s.mode
        if mode in ("start", "text", "plain"):
            if token == p.task_open:
                return replace(s, mode="decide", queue=tuple(p.decode_lead))
            if token == p.phrase_open:
                return replace(s, mode="phrase_first", name=())
            return replace(s, mode="plain" if mode == "plain" else "text", parts=_add_word(s.parts, token))
        if mode == "decide":
            if token == p.true:
                return replace(s, mode="name_first", decode=True, queue=(*p.true_tail, *p.entry))
            return replace(s, mode="plain", decode=False, queue=(*p.false_tail, p.task_close))
        if mode in ("name_first", "name"):
            if mode == "name" and token == p.unit_lead[0]:
                return replace(s, mode="plan_unit", units=(), queue=(*p.unit_lead[1:], p.unit_open))
            return replace(s, mode="name", name=(*s.name, token))
        if mode in ("plan_unit", "group_unit"):
            unit = p.unit_of.get(token, "box")
            return replace(s, mode=mode + "_more", units=(*s.units, unit))
        if mode in ("plan_unit_more", "group_unit_more"):
            if token == p.comma:
                return replace(s, mode=mode.removesuffix("_more"))
            if mode == "plan_unit_more":
                return replace(s, mode="num", queue=tuple(p.num_lead))
            return replace(s, mode="refs", count=1, queue=(*p.label(0), p.ref))
        if mode == "num":
            count = p.numbers.index(token) if token in p.numbers else 1
            return replace(s, mode="entry_next", entries=(*s.entries, Part("phrase", s.name, s.units, count)),
                           name=(), units=())  # fmt: skip
        if mode == "entry_next":
            if token == p.task_close:
                queue = [t for e in s.entries for t in p.triplet(list(e.ids), e.units, e.count)]
                return replace(s, mode="end", queue=tuple(queue), parts=s.entries)
            return replace(s, mode="name_first", queue=tuple(p.entry[1:]))
        if mode in ("phrase_first", "phrase"):
            if mode == "phrase" and token == p.phrase_close:
                return replace(s, mode="group_unit", units=(), queue=(p.group_open, p.unit_open))
            return replace(s, mode="phrase", name=(*s.name, token))
        if mode == "refs":
            if token == p.group_close:
                return replace(s, mode="text", parts=(*s.parts, Part("phrase", s.name, s.units, s.count)), name=(),
                               units=(), count=0)  # fmt: skip
            return replace(s, count=s.count + 1, queue=(*p.label(s.count)[1:], p.ref))
        return s  # "end": only EOS comes


def _add_word(parts: tuple[Part, ...], token: int) -> tuple[Part, ...]:
    if parts and parts[-1].kind == "text":
        return (*parts[:-1], Part("text", (*parts[-1].ids, token)))
    return (*parts, Part("text", (token,)))
