"""The grammar of ChatRex's retrieval answers, for ``perceive.models.generation.generate``:

    text      words, bare <objK>, <ground>, EOS
    start     (after <ground>) words
    phrase    (after a word of the phrase) words, </ground>
    need-objs (after </ground>) <objects>
    first     (after <objects>) an unused <objK>, or "None"
    indices   (after an index) an unused <objK>, </objects>
    close     (after "None") </objects>

and every ``<objK>`` needs ``K`` < the number of input boxes. Inside ``<objects>`` the decoder goes on
while the allowed indices together are likelier than stopping (``index_or_stop``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perceive.formats.chatrex import NONE_ANSWER
from perceive.models.generation import Grammar
from perceive.tokenization import (
    ASSISTANT,
    GROUND_CLOSE,
    GROUND_OPEN,
    IMAGE,
    OBJ_TOKENS,
    OBJECTS_CLOSE,
    OBJECTS_OPEN,
    PAD,
    ROI,
    UNK,
    USER,
)

INDEX_STATES = ("first", "indices")
# tokens a state needs to end well-formed: e.g. a phrase needs </ground> <objects> None </objects>
FINISH = {"text": 1, "start": 5, "phrase": 4, "need-objs": 3, "first": 2, "indices": 1, "close": 1}


@dataclass(frozen=True)
class ChatRexState:
    name: str
    num_boxes: int
    used: frozenset[int] = frozenset()  # indices already listed in the open objects block


class ChatRexGrammar(Grammar):
    """Token-id masks of the grammar's states for one tokenizer and vocabulary size."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        ids = tokenizer.convert_tokens_to_ids
        self.obj_ids = torch.tensor([ids(t) for t in OBJ_TOKENS])
        self.obj_index = {int(t): k for k, t in enumerate(self.obj_ids)}
        self.ground_open, self.ground_close = ids(GROUND_OPEN), ids(GROUND_CLOSE)
        self.objects_open, self.objects_close = ids(OBJECTS_OPEN), ids(OBJECTS_CLOSE)
        self.eos = tokenizer.eos_token_id
        none = tokenizer(NONE_ANSWER, add_special_tokens=False)["input_ids"]
        self.none = none[0] if len(none) == 1 else None
        markup = (IMAGE, ROI, USER, ASSISTANT, PAD, UNK, GROUND_OPEN, GROUND_CLOSE, OBJECTS_OPEN, OBJECTS_CLOSE)
        special = {*tokenizer.all_special_ids, *(ids(t) for t in markup)}
        self.words = torch.zeros(vocab_size, dtype=torch.bool)
        self.words[: len(tokenizer)] = True  # a pretrained model's rows past its tokenizer are padding, no word
        self.words[list(s for s in special if s is not None and s < vocab_size)] = False
        self.vocab_size = vocab_size

    def start(self, num_boxes: int = 0, **_) -> ChatRexState:
        return ChatRexState("text", num_boxes)

    def allowed(self, state: ChatRexState, budget: int = 1 << 30) -> torch.Tensor:
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        objs = self.obj_ids[: state.num_boxes]
        name = state.name
        if name == "text":
            m |= self.words
            m[objs] = True
            m[self.eos] = True
            # a group opened now must still close: <ground> and then the shortest group after it
            m[self.ground_open] = budget > FINISH["start"]
        elif name == "start":
            m |= self.words
        elif name == "phrase":
            m |= self.words
            m[self.ground_close] = True
        elif name == "need-objs":
            m[self.objects_open] = True
        elif name in INDEX_STATES:
            free = [int(t) for k, t in enumerate(objs) if k not in state.used]
            m[free] = True
            if name == "first" and self.none is not None:
                m[self.none] = True
            if name == "indices" or (not free and self.none is None):
                m[self.objects_close] = True
        elif name == "close":
            m[self.objects_close] = True
        return m

    def finish(self, state: ChatRexState) -> torch.Tensor:
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state.name == "start":
            return self.words.clone()
        nxt = {
            "text": self.eos,
            "phrase": self.ground_close,
            "need-objs": self.objects_open,
            "first": self.none if self.none is not None else self.objects_close,
        }.get(state.name, self.objects_close)
        m[nxt] = True
        return m

    def tokens_to_finish(self, state: ChatRexState) -> int:
        return FINISH[state.name]

    def advance(self, state: ChatRexState, token: int) -> ChatRexState:
        name = state.name
        if name == "text":
            return ChatRexState("start" if token == self.ground_open else "text", state.num_boxes)
        if name == "start":
            return ChatRexState("phrase", state.num_boxes)
        if name == "phrase":
            return ChatRexState("need-objs" if token == self.ground_close else "phrase", state.num_boxes)
        if name == "need-objs":
            return ChatRexState("first", state.num_boxes)
        if name in INDEX_STATES:
            if token == self.objects_close:
                return ChatRexState("text", state.num_boxes)
            if self.none is not None and token == self.none:
                return ChatRexState("close", state.num_boxes)
            return ChatRexState("indices", state.num_boxes, state.used | {self.obj_index[token]})
        return ChatRexState("text", state.num_boxes)  # "close": </objects>

    def is_choice(self, state: ChatRexState) -> bool:
        return state.name in (*INDEX_STATES, "close")

    def choose(self, state: ChatRexState, probs: torch.Tensor, argmax: int) -> int:
        return self.index_or_stop(probs, argmax) if state.name in INDEX_STATES else argmax

    def index_or_stop(self, probs: torch.Tensor, argmax: int) -> int:
        """Inside ``<objects>``: continue with the likeliest index when the indices together outweigh the
        stop token (``</objects>`` or None), else stop. Training scores an index step by the probability
        of *any* remaining member, so the model spreads the continue mass over the members; comparing the
        stop token with one index alone would end lists early whenever several objects remain."""
        stops = [t for t in (self.objects_close, self.none) if t is not None and probs[t] > 0]
        index_mass = probs[self.obj_ids].sum()
        if not stops or index_mass <= 0:
            return argmax
        stop = max(stops, key=lambda t: float(probs[t]))
        if index_mass > probs[stop]:
            return int(self.obj_ids[int(probs[self.obj_ids].argmax())])
        return stop

    def plan(self, tokenizer, phrases: list[str]) -> list[int]:
        """Tokens the decoder writes for a grounding answer: each group's opening, phrase and ``<objects>``."""
        out: list[int] = []
        for phrase in phrases:
            out += [self.ground_open, *tokenizer(phrase, add_special_tokens=False)["input_ids"], self.ground_close,
                    self.objects_open]  # fmt: skip
        return out
