"""Greedy decoding with a KV cache, constrained so that every answer is well-formed ChatRex markup.

The constraint is a small grammar run per sample over the generated tokens:

    text      words, bare <objK>, <ground>, EOS
    start     (after <ground>) words
    phrase    (after a word of the phrase) words, </ground>
    need-objs (after </ground>) <objects>
    first     (after <objects>) an unused <objK>, or "none"
    indices   (after an index) an unused <objK>, </objects>
    close     (after "none") </objects>

and every ``<objK>`` needs ``K`` < the number of input boxes. Inside ``<objects>`` the decoder goes on
while the allowed indices together are likelier than stopping (``_index_or_stop``). An index's
probability under the constrained distribution is kept: ``score = proposal score x P(index)`` is the
object's confidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from perceive.tokenization import (
    ASSISTANT,
    EOS,
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


@dataclass
class Generated:
    token_ids: list[int]
    index_probs: list[tuple[int, float]] = field(default_factory=list)  # (box index, P(index))
    finished: bool = False


class GrammarMasks:
    """Token-id masks of the grammar's states for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        ids = tokenizer.convert_tokens_to_ids
        self.obj_ids = torch.tensor([ids(t) for t in OBJ_TOKENS])
        self.ground_open, self.ground_close = ids(GROUND_OPEN), ids(GROUND_CLOSE)
        self.objects_open, self.objects_close = ids(OBJECTS_OPEN), ids(OBJECTS_CLOSE)
        self.eos = ids(EOS)
        none = tokenizer(NONE_WORD, add_special_tokens=False)["input_ids"]
        self.none = none[0] if len(none) == 1 else None
        special = {ids(t) for t in (IMAGE, ROI, USER, ASSISTANT, PAD, UNK, EOS, GROUND_OPEN, GROUND_CLOSE,
                                    OBJECTS_OPEN, OBJECTS_CLOSE, *OBJ_TOKENS)}  # fmt: skip
        self.words = torch.ones(vocab_size, dtype=torch.bool)
        self.words[list(s for s in special if s is not None and s < vocab_size)] = False
        self.vocab_size = vocab_size

    def allowed(self, state: str, num_boxes: int, used: set[int]) -> torch.Tensor:
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        objs = self.obj_ids[:num_boxes]
        if state == "text":
            m |= self.words
            m[objs] = True
            m[[self.ground_open, self.eos]] = True
        elif state == "start":
            m |= self.words
        elif state == "phrase":
            m |= self.words
            m[self.ground_close] = True
        elif state == "need-objs":
            m[self.objects_open] = True
        elif state in ("first", "indices"):
            free = [int(t) for k, t in enumerate(objs) if k not in used]
            m[free] = True
            if state == "first" and self.none is not None:
                m[self.none] = True
            if state == "indices" or (not free and self.none is None):
                m[self.objects_close] = True
        elif state == "close":
            m[self.objects_close] = True
        return m

    def finish(self, state: str) -> torch.Tensor:
        """The next token of the shortest well-formed ending from ``state``."""
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if state == "start":
            return self.words.clone()
        nxt = {
            "text": self.eos,
            "phrase": self.ground_close,
            "need-objs": self.objects_open,
            "first": self.none if self.none is not None else self.objects_close,
        }.get(state, self.objects_close)
        m[nxt] = True
        return m

    def advance(self, state: str, token: int, used: set[int]) -> str:
        if state == "text":
            return "start" if token == self.ground_open else "text"
        if state == "start":
            return "phrase"
        if state == "phrase":
            return "need-objs" if token == self.ground_close else "phrase"
        if state == "need-objs":
            used.clear()
            return "first"
        if state in ("first", "indices"):
            if token == self.objects_close:
                return "text"
            if self.none is not None and token == self.none:
                return "close"
            used.add(int((self.obj_ids == token).nonzero()[0, 0]))
            return "indices"
        return "text"  # "close": </objects>


def _plan(tokenizer, masks: GrammarMasks, phrases: list[str]) -> list[int]:
    """Tokens the decoder writes for a grounding answer: each group's opening, phrase and <objects>."""
    out: list[int] = []
    for phrase in phrases:
        out += [masks.ground_open, *tokenizer(phrase, add_special_tokens=False)["input_ids"], masks.ground_close,
                masks.objects_open]  # fmt: skip
    return out


def _index_or_stop(probs: torch.Tensor, masks: GrammarMasks, argmax: int) -> int:
    """Inside ``<objects>``: continue with the likeliest index when the indices together outweigh the
    stop token (``</objects>`` or None), else stop. Training scores an index step by the probability
    of *any* remaining member, so the model spreads the continue mass over the members; comparing the
    stop token with one index alone would end lists early whenever several objects remain."""
    stops = [t for t in (masks.objects_close, masks.none) if t is not None and probs[t] > 0]
    index_mass = probs[masks.obj_ids].sum()
    if not stops or index_mass <= 0:
        return argmax
    stop = max(stops, key=lambda t: float(probs[t]))
    if index_mass > probs[stop]:
        return int(masks.obj_ids[int(probs[masks.obj_ids].argmax())])
    return stop


NONE_WORD = "None"
# tokens a state needs to end well-formed: e.g. a phrase needs </ground> <objects> None </objects>
FINISH = {"text": 1, "start": 5, "phrase": 4, "need-objs": 3, "first": 2, "indices": 1, "close": 1}


@torch.no_grad()
def generate(
    model,
    batch: dict,
    tokenizer,
    max_new_tokens: int = 96,
    constrained: bool = True,
    forced: list[list[int]] | None = None,
    phrases: list[list[str] | None] | None = None,
) -> list[Generated]:
    """Greedy answers for a left-padded batch from ``PerceiverProcessor.collate(..., pad_left=True)``, with
    pixel tensors or with ``visual``, the output of ``encode_visual`` for the same boxes.

    ``forced`` supplies each sample's tokens instead of the argmax (then EOS), through the very same
    loop: it measures what an answer of a given length costs to decode, whatever the model would say.

    ``phrases`` (per sample, or None) are the phrases a grounding question asked for: the decoder then
    writes ``<ground>phrase</ground><objects>`` for each in turn itself and the model chooses only
    the indices (or None) of each group: the answer's structure is the question's, its content the
    model's."""
    attention = batch["attention_mask"]
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    visual = batch.get("visual")
    if visual is None:  # encoded once here: generated <objK> tokens carry object features too
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
    inputs = {k: v for k, v in batch.items() if k in _FORWARD_KEYS}
    out = model(**inputs, visual=visual, position_ids=position_ids, use_cache=True)
    cache, keys, pointer_inputs = out.past_key_values, out.pointer_keys, out.pointer_inputs
    logits = out.logits[:, -1]
    box_mask = batch["box_mask"]
    num_boxes = box_mask.sum(dim=1).tolist()
    vocab = logits.shape[-1]
    masks = GrammarMasks(tokenizer, vocab)
    b = logits.shape[0]
    results = [Generated([]) for _ in range(b)]
    states = ["text"] * b
    used: list[set[int]] = [set() for _ in range(b)]
    next_pos = position_ids[:, -1] + 1
    plans = [_plan(tokenizer, masks, p) if p else None for p in (phrases or [None] * b)]
    for step in range(max_new_tokens):
        chosen = []
        for i in range(b):
            if results[i].finished:
                chosen.append(masks.eos)
                continue
            row = logits[i].float()
            if constrained:
                left = max_new_tokens - step
                if left <= FINISH[states[i]]:  # only just enough room left: take the shortest way out
                    allow = masks.finish(states[i])
                else:
                    allow = masks.allowed(states[i], num_boxes[i], used[i])
                row = row.masked_fill(~allow.to(row.device), float("-inf"))
            probs = row.softmax(-1)
            tok = int(row.argmax())
            if constrained and states[i] in ("first", "indices"):
                tok = _index_or_stop(probs, masks, tok)
            if forced is not None:
                tok = forced[i][step] if step < len(forced[i]) else masks.eos
            plan = plans[i]
            if plan is not None and states[i] not in ("first", "indices", "close"):
                tok = plan.pop(0) if plan else masks.eos  # the decoder writes the asked phrase itself
            chosen.append(tok)
            r = results[i]
            if tok == masks.eos:
                r.finished = True
                continue
            r.token_ids.append(tok)
            k = (masks.obj_ids == tok).nonzero()
            if len(k) and states[i] in ("first", "indices"):
                r.index_probs.append((int(k[0, 0]), float(probs[tok])))
            if constrained and forced is None:
                states[i] = masks.advance(states[i], tok, used[i])
        if all(r.finished for r in results):
            break
        new = torch.tensor(chosen, device=attention.device)[:, None]
        attention = torch.cat([attention, torch.ones_like(new)], dim=1)
        emb = model.embed_generated(new, visual["object_tokens"], box_mask)
        lm = model.language_model.model(inputs_embeds=emb, attention_mask=attention, position_ids=next_pos[:, None],
                                        past_key_values=cache, use_cache=True)  # fmt: skip
        cache = lm.past_key_values
        next_pos = next_pos + 1
        logits = model._logits(lm.last_hidden_state, keys, box_mask, pointer_inputs)[:, -1]
    return results


_FORWARD_KEYS = ("input_ids", "attention_mask", "boxes", "box_mask")
