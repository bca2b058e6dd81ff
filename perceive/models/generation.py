"""Greedy decoding with a KV cache under a grammar, for any model and any grounded output format.

A model opens a ``DecodingSession`` over a left-padded batch (the prompt's forward pass, its cache and
the first next-token logits) and advances it one token per sample per step. A ``Grammar`` is a small
automaton per sample over the generated token ids: in each state it says which tokens may come next,
and how to end well-formed in the fewest tokens, so every answer parses and closes what it opened
within the token budget. The retrieval format's grammar is ``perceive.models.grammar_chatrex``; another
format brings its own.

Each token's probability under the constrained distribution is kept (``Generated.probs``), so a model
can turn the probability of a choice (an object index, say) into a confidence.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import Qwen2Model

# transformers 5.24 renamed the language models' ``past_key_values`` argument and output to ``cache`` (the old name
# warns until it is removed); perceive speaks whichever the installed version takes
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a transformers language model's output carries, by either name."""
    return getattr(output, CACHE_ARGUMENT)


class DecodingSession(Protocol):
    """A batch being decoded: ``logits`` ``[B, V]`` of each sample's next token; ``step`` feeds one
    token per sample (``[B]``) and returns the logits after it."""

    logits: torch.Tensor

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


class Grammar(ABC):
    """An output format's grammar over token ids. States are values: ``advance`` returns a new one."""

    eos: int

    @abstractmethod
    def start(self, **sample: Any) -> Any:
        """The state before a sample's first answer token (``sample``: what the format needs, e.g. its
        number of input boxes)."""

    @abstractmethod
    def allowed(self, state: Any, budget: int) -> torch.Tensor:
        """``[V]`` bool: the tokens that may come next when ``budget`` tokens are left, this one included; a
        token is allowed only if a well-formed ending still fits after it."""

    @abstractmethod
    def finish(self, state: Any) -> torch.Tensor:
        """``[V]`` bool: the next token of the shortest well-formed ending."""

    @abstractmethod
    def tokens_to_finish(self, state: Any) -> int:
        """How many tokens the shortest well-formed ending from ``state`` takes, EOS included."""

    @abstractmethod
    def advance(self, state: Any, token: int) -> Any:
        """The state after ``token``."""

    def is_choice(self, state: Any) -> bool:
        """Whether the model chooses here even when a plan writes the rest of the answer (``generate``'s
        ``plans``): a grounding answer's object indices, say."""
        return False

    def choose(self, state: Any, probs: torch.Tensor, argmax: int) -> int:
        """The token taken from ``probs`` (already constrained); greedy by default."""
        return argmax


@dataclass
class Generated:
    token_ids: list[int]
    probs: list[float] = field(default_factory=list)  # each token's probability under the constrained distribution
    in_choice: list[bool] = field(default_factory=list)  # each token: chosen in a state where ``Grammar.is_choice``
    finished: bool = False


@torch.no_grad()
def generate(
    session: DecodingSession,
    grammar: Grammar,
    samples: list[dict],
    max_new_tokens: int = 96,
    constrained: bool = True,
    forced: list[list[int]] | None = None,
    plans: list[list[int] | None] | None = None,
) -> list[Generated]:
    """Greedy answers for the batch of ``session``, one per entry of ``samples`` (each ``Grammar.start``'s
    keyword arguments).

    ``forced`` supplies each sample's tokens instead of the argmax (then EOS), through the very same
    loop: it measures what an answer of a given length costs to decode, whatever the model would say.
    ``plans`` (per sample, or None) are tokens the decoder writes itself wherever the grammar's state is
    not a choice (``Grammar.is_choice``): the answer's structure is the plan's, its choices the model's."""
    b = len(samples)
    logits = session.logits
    results = [Generated([]) for _ in range(b)]
    states = [grammar.start(**s) for s in samples]
    pending = [list(p) if p is not None else None for p in (plans or [None] * b)]
    for step in range(max_new_tokens):
        chosen = []
        for i in range(b):
            r = results[i]
            if r.finished:
                chosen.append(grammar.eos)
                continue
            row = logits[i].float()
            if constrained:
                budget = max_new_tokens - step
                if budget <= grammar.tokens_to_finish(states[i]):  # just enough room: the shortest way out
                    allow = grammar.finish(states[i])
                else:
                    allow = grammar.allowed(states[i], budget)
                row = row.masked_fill(~allow.to(row.device), float("-inf"))
            probs = row.softmax(-1)
            tok = int(row.argmax())
            if constrained:
                tok = grammar.choose(states[i], probs, tok)
            if forced is not None:
                tok = forced[i][step] if step < len(forced[i]) else grammar.eos
            plan = pending[i]
            choice = grammar.is_choice(states[i])
            if plan is not None and not choice:
                tok = plan.pop(0) if plan else grammar.eos
            chosen.append(tok)
            if tok == grammar.eos:
                r.finished = True
                continue
            r.token_ids.append(tok)
            r.probs.append(float(probs[tok]))
            r.in_choice.append(choice)
            if constrained and forced is None:
                states[i] = grammar.advance(states[i], tok)
        if all(r.finished for r in results):
            break
        logits = session.step(torch.tensor(chosen, device=logits.device))
    return results
