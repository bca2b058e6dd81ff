"""How much the pointer's order reading moves the boxes' scores, by form of referring expression.

    python benchmarks/order_reading.py checkpoints/tiny out/tinyN/model [...] [--scenes 96]

For models with ``order_embedding="pointer_reading"``: at the ``<objects>`` token of each referring
expression in held-out world scenes (the true boxes, teacher-forced answers), the reading's largest
softmax probability over the order features (1/40 when flat) and the standard deviation over the
scene's boxes of what it adds to their scores (0 when flat). An expression about no rank ("the
circles that are not red") has nothing to gain from either; an extreme or ordinal one should peak.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.train.data import WorldTasks
from perceive.train.trainer import RECIPES
from perceive.world.generator import WorldConfig

SEED = 4242  # scene numbers (seed x 1,000,003 + index) far from the training streams' (seeds up to 6)


def reading_by_form(folder: str, scenes: int, batch_size: int = 16) -> dict[str, tuple[int, float, float]]:
    """``{form: (expressions, mean peak probability, mean score spread)}`` over ``scenes`` world scenes."""
    perceiver = ChatRexPerceiver.from_pretrained(folder)
    model = perceiver.model
    if getattr(model.config, "order_embedding", None) != "pointer_reading":
        raise SystemExit(f"{folder}: the model has no order reading (order_embedding='pointer_reading')")
    data = WorldTasks(perceiver.processor, WorldConfig(**RECIPES["tiny"].world), seed=SEED,
                      task_weights={"refer": 1.0})  # fmt: skip
    # the readings the pointer adds, at every token ([B, T, F]; the order loss's own call reads [N, F])
    readings: list[torch.Tensor] = []
    model.order_reading.register_forward_hook(lambda _m, _i, out: readings.append(out) if out.dim() == 3 else None)
    peaks, spreads = defaultdict(list), defaultdict(list)
    with torch.no_grad():
        for start in range(0, scenes, batch_size):
            batch, items = data.batch(list(range(start, min(start + batch_size, scenes))))
            readings.clear()
            order = model(**batch).pointer_inputs["object_order"].float()
            for i, item in enumerate(items):
                for g, program in enumerate(item.qa.meta["programs"]):
                    position = int(batch["group_positions"][i, g])
                    if position < 0:  # a rejection: no <objects>
                        continue
                    reading = readings[0][i, position].float()
                    added = order[i] @ reading
                    peaks[program["form"]].append(float(reading.softmax(-1).max()))
                    spreads[program["form"]].append(float(added[batch["box_mask"][i]].std()))
    return {f: (len(peaks[f]), sum(peaks[f]) / len(peaks[f]), sum(spreads[f]) / len(spreads[f])) for f in sorted(peaks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders (ChatRexPerceiver.from_pretrained)")
    parser.add_argument("--scenes", type=int, default=96)
    args = parser.parse_args()
    tables = [reading_by_form(m, args.scenes) for m in args.models]
    forms = sorted(set().union(*tables))
    print("peak probability / score spread of the order reading at each expression's <objects> token\n")
    print("| form | n | " + " | ".join(args.models) + " |")
    print("|---|---|" + "---|" * len(args.models))
    for f in forms:
        n = max(t.get(f, (0,))[0] for t in tables)
        cells = [f"{t[f][1]:.2f} / {t[f][2]:.2f}" if f in t else "-" for t in tables]
        print(f"| {f} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
