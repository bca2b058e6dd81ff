"""The decoding loop (``perceive.models.generation``) with no model: sessions that hand out logits, a toy
grammar, and the retrieval grammar (``perceive.models.grammar_chatrex``) under random logits."""

import pytest
import torch

from perceive.formats import chatrex
from perceive.models.generation import Generated, Grammar, generate
from perceive.models.grammar_chatrex import ChatRexGrammar
from perceive.tokenization import detokenize


class ScriptedSession:
    """Logits from a function of (sample, step); records what was fed back."""

    def __init__(self, batch: int, vocab: int, logits_of) -> None:
        self.batch, self.vocab, self.logits_of, self.step_no = batch, vocab, logits_of, 0
        self.fed: list[list[int]] = []
        self.logits = self._logits()

    def _logits(self) -> torch.Tensor:
        return torch.stack([self.logits_of(i, self.step_no) for i in range(self.batch)])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.fed.append(tokens.tolist())
        self.step_no += 1
        self.logits = self._logits()
        return self.logits


class Brackets(Grammar):
    """Tokens: 0 EOS, 1 "(", 2 ")", 3 "x". Balanced brackets, at most ``depth`` deep."""

    eos = 0

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth

    def start(self, **_) -> int:
        return 0  # the open brackets

    def allowed(self, state: int, budget: int) -> torch.Tensor:
        m = torch.tensor([state == 0, state < self.depth and budget > state + 2, state > 0, True])
        return m

    def finish(self, state: int) -> torch.Tensor:
        return torch.tensor([state == 0, False, state > 0, False])

    def tokens_to_finish(self, state: int) -> int:
        return state + 1

    def advance(self, state: int, token: int) -> int:
        return state + {1: 1, 2: -1}.get(token, 0)


def _balanced(tokens: list[int]) -> bool:
    depth = 0
    for t in tokens:
        depth += {1: 1, 2: -1}.get(t, 0)
        if depth < 0:
            return False
    return depth == 0


@pytest.mark.parametrize("budget", [1, 2, 3, 5, 9])
def test_every_answer_is_well_formed_within_its_budget(budget):
    """A session that always wants another "(" still gets balanced answers that end within the budget."""
    wants_open = torch.tensor([0.0, 5.0, 1.0, 2.0])
    session = ScriptedSession(
        3, 4, lambda i, t: wants_open + torch.randn(4, generator=torch.Generator().manual_seed(i))
    )
    out = generate(session, Brackets(), [{}] * 3, max_new_tokens=budget)
    for g in out:
        assert _balanced(g.token_ids) and len(g.token_ids) <= budget, g.token_ids
        assert all(0 < p <= 1 for p in g.probs) and len(g.probs) == len(g.token_ids)


def test_finished_samples_are_fed_eos_and_the_loop_stops_when_all_are_done():
    eos_now = torch.tensor([9.0, 0.0, 0.0, 0.0])
    later = {0: torch.tensor([0.0, 0.0, 0.0, 9.0]), 1: eos_now}  # sample 0 writes x twice, then stops
    session = ScriptedSession(2, 4, lambda i, t: later[i] if not (i == 0 and t >= 2) else eos_now)
    out = generate(session, Brackets(), [{}, {}], max_new_tokens=10)
    assert out[0].token_ids == [3, 3] and out[1].token_ids == [] and all(g.finished for g in out)
    assert session.fed == [[3, 0], [3, 0]]  # two steps, the finished sample fed EOS; no step after both ended


def test_forced_tokens_and_plans():
    flat = torch.zeros(4)
    forced = generate(ScriptedSession(1, 4, lambda i, t: flat), Brackets(), [{}], 6, forced=[[1, 3, 2]])
    assert forced[0].token_ids == [1, 3, 2]
    # a plan is written wherever the grammar's state is no choice (here: never), then EOS
    planned = generate(ScriptedSession(1, 4, lambda i, t: flat), Brackets(), [{}], 6, plans=[[3, 3]])
    assert planned[0].token_ids == [3, 3] and not any(planned[0].in_choice)


def test_unconstrained_decoding_is_plain_greedy():
    wants_close = torch.tensor([0.0, 0.0, 5.0, 0.0])
    out = generate(ScriptedSession(1, 4, lambda i, t: wants_close), Brackets(), [{}], 3, constrained=False)
    assert out[0].token_ids == [2, 2, 2] and isinstance(out[0], Generated)


@pytest.fixture(scope="module")
def grammar(world_tokenizer):
    return ChatRexGrammar(world_tokenizer, len(world_tokenizer))


def test_lists_go_on_while_the_indices_together_outweigh_stopping(world_tokenizer, grammar):
    obj = grammar.obj_ids
    probs = torch.zeros(len(world_tokenizer))
    probs[grammar.objects_close], probs[obj[3]], probs[obj[5]], probs[obj[8]] = 0.31, 0.25, 0.24, 0.2
    # </objects> is the single likeliest token, but three remaining members hold 0.69 together
    assert grammar.index_or_stop(probs, grammar.objects_close) == obj[3]
    probs[grammar.objects_close], probs[obj[3]], probs[obj[5]], probs[obj[8]] = 0.55, 0.25, 0.15, 0.05
    assert grammar.index_or_stop(probs, grammar.objects_close) == grammar.objects_close
    first = torch.zeros(len(world_tokenizer))  # the first index: None is the stop
    first[grammar.none], first[obj[0]], first[obj[1]] = 0.4, 0.35, 0.25
    assert grammar.index_or_stop(first, grammar.none) == obj[0]
    first[grammar.none], first[obj[0]], first[obj[1]] = 0.7, 0.2, 0.1
    assert grammar.index_or_stop(first, grammar.none) == grammar.none


@pytest.mark.parametrize("budget", range(1, 13))
def test_retrieval_answers_parse_under_any_logits_and_budget(world_tokenizer, grammar, budget):
    """Random logits that favour markup: every answer is well-formed ChatRex, its indices below the number
    of boxes and unique in their group, and no longer than the budget."""
    vocab = len(world_tokenizer)
    markup = [grammar.ground_open, grammar.ground_close, grammar.objects_open, grammar.objects_close, *grammar.obj_ids]

    def logits(i: int, t: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 * budget + 10 * i + t)
        row = torch.randn(vocab, generator=g)
        row[markup] += 3.0
        return row

    boxes = [0, 1, 3, 7]
    out = generate(ScriptedSession(4, vocab, logits), grammar, [{"num_boxes": n} for n in boxes], budget)
    for g, n in zip(out, boxes, strict=True):
        text = detokenize(world_tokenizer.convert_ids_to_tokens(g.token_ids))
        parsed = chatrex.parse(text, n)
        assert parsed.problems == () and len(g.token_ids) <= budget, (text, parsed.problems)


def test_the_retrieval_grammar_tracks_each_objects_block(world_tokenizer, grammar):
    ids = world_tokenizer.convert_tokens_to_ids
    state = grammar.start(num_boxes=3)
    for token in ("<ground>", "circle", "</ground>", "<objects>", "<obj2>"):
        state = grammar.advance(state, ids(token))
    assert state.name == "indices" and state.used == {2}
    allowed = grammar.allowed(state, 10)
    assert allowed[ids("<obj0>")] and allowed[ids("<obj1>")] and not allowed[ids("<obj2>")]
    assert not allowed[ids("<obj3>")] and allowed[grammar.objects_close]
    state = grammar.advance(state, grammar.objects_close)
    assert state.name == "text" and not state.used
    # with five tokens left no group can open and close: <ground> is not offered
    assert not grammar.allowed(state, 5)[grammar.ground_open] and grammar.allowed(state, 6)[grammar.ground_open]
    plan = grammar.plan(world_tokenizer, ["red circle"])
    assert plan == [ids("<ground>"), *world_tokenizer("red circle", add_special_tokens=False)["input_ids"],
                    ids("</ground>"), ids("<objects>")]  # fmt: skip
