"""What REF-VLM's TRP grammar adds: the same questions answered greedily with and without it.

    python benchmarks/refvlm_grammar.py --model checkpoints/refvlm-tiny [--split validation] [--n 30]

Each held-out record is asked Table II's questions that need no visual prompt (REC on its expressions, FOVD, FOVS,
keypoints, GCG). Prints, for free decoding and for decoding under the grammar, the share of answers that are
well-formed (every token one the grammar allows, ended where it may end: what parses with no problem once rendered),
the share whose ``<REF>`` count is the true number of targets, and the tokens and seconds per answer.
"""

from __future__ import annotations

import argparse
import random
import time

from perceive.data.sources.world import WorldSource
from perceive.data.tasks_refvlm import REFVLM_TASKS, refvlm_item
from perceive.eval.benchmark import held_out_seed
from perceive.models.refvlm.perceiver_refvlm import RefVlmPerceiver
from perceive.perceiver import load
from perceive.train.refvlm import RefVlmRecipe
from perceive.world.generator import WorldConfig

TASKS = ("refer_box", "detect", "segment", "keypoint", "caption")


def well_formed(perceiver: RefVlmPerceiver, tokens: list[int]) -> bool:
    """Whether the grammar allows every token of ``tokens`` and then the end."""
    grammar = perceiver.grammar
    state = grammar.start()
    for token in tokens:
        if not bool(grammar.allowed(state)[token]):
            return False
        state = grammar.advance(state, token)
    return bool(grammar.allowed(state)[grammar.eos])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="checkpoints/refvlm-tiny")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    perceiver = load(args.model)
    if not isinstance(perceiver, RefVlmPerceiver):
        raise SystemExit(f"{args.model} is not a REF-VLM model")
    source = WorldSource(WorldConfig(**RefVlmRecipe().world), masks=True)
    first = held_out_seed(args.split, args.n)
    rows: dict[bool, list] = {True: [], False: []}
    assert set(TASKS) <= set(REFVLM_TASKS)
    for k in range(args.n):
        record = source.record(first + k)
        encoded = perceiver.encode_batch([record.image()])[0]
        for task in TASKS:
            item = refvlm_item(record, task, random.Random(k))
            if item is None:
                continue
            truth = sum(len(g.targets) for g in item.groups)
            for constrained in (True, False):
                t0 = time.perf_counter()
                decoded = perceiver.generate(encoded, item.question, item.prompts, constrained=constrained)
                seconds = time.perf_counter() - t0
                refs = decoded.tokens.count(perceiver.processor.pieces.ref)
                rows[constrained].append((well_formed(perceiver, decoded.tokens), refs == truth, len(decoded.tokens),
                                          seconds))  # fmt: skip
    print(f"{args.n} {args.split} records, {len(rows[True])} questions ({', '.join(TASKS)})\n")
    print("| decoding | well-formed | right <REF> count | tokens per answer | seconds per answer |")
    print("|---|---|---|---|---|")
    for constrained, name in ((False, "free (greedy)"), (True, "under the TRP grammar")):
        r = rows[constrained]
        n = max(1, len(r))
        print(f"| {name} | {sum(x[0] for x in r) / n:.3f} | {sum(x[1] for x in r) / n:.3f} | "
              f"{sum(x[2] for x in r) / n:.1f} | {sum(x[3] for x in r) / n:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
