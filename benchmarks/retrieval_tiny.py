"""The tiny retrieval model against issue 4's targets, on held-out world scenes with its own proposals.

    python benchmarks/retrieval_tiny.py [--model checkpoints/tiny] [--n 100] [--train-log out/tiny/train_log.jsonl]
        [--split validation] [--without-order-reading]

Prints the targets table (measured, target, met), referring by domain, throughput of ``ask`` at
batch 1 and 16, and, given the training log, training speed per phase. ``--without-order-reading``
measures what a model's order reading (``order_embedding="pointer_reading"``) does for it: the
reading adds nothing to the boxes' scores, the rest of the model as trained. ``--split validation``
measures on other held-out scenes, for choosing between trained models without fitting the test ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from perceive.eval import benchmark
from perceive.eval.report import markdown
from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver


def training_speed(log: Path) -> str:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    lines = ["| phase | steps | steps/s (last) |", "|---|---|---|"]
    for phase in ("upn", "upn_refine", "mllm"):
        pts = [r for r in rows if r["phase"] == phase]
        if pts:
            lines.append(f"| {phase} | {pts[-1]['step']} | {pts[-1]['steps_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def without_order_reading(perceiver: ChatRexPerceiver) -> None:
    """The order reading outputs zeros: each box's score keeps its pointer and anchor terms only."""
    model = perceiver.model
    if getattr(model.config, "order_embedding", None) != "pointer_reading":
        raise SystemExit("--without-order-reading: the model has no order reading (order_embedding='pointer_reading')")
    model.order_reading.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--train-log", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--split", choices=tuple(benchmark.SPLIT_SEEDS), default="test",
                    help="held-out scenes to measure on; choose between models on validation")  # fmt: skip
    ap.add_argument("--free-phrases", action="store_true", help="the model writes the asked phrases itself too")
    ap.add_argument("--without-order-reading", action="store_true", help="the order reading adds nothing (ablation)")
    args = ap.parse_args()
    perceiver = ChatRexPerceiver.from_pretrained(args.model)
    if args.without_order_reading:
        without_order_reading(perceiver)
    report = benchmark.run(perceiver, n=args.n, progress=False, force_phrases=not args.free_phrases,
                           split=args.split)  # fmt: skip
    sys.stdout.write(markdown(report))
    if args.train_log and args.train_log.is_file():
        sys.stdout.write("\n## training speed\n\n" + training_speed(args.train_log))
    if args.out:
        benchmark.write(report, args.out)


if __name__ == "__main__":
    main()
