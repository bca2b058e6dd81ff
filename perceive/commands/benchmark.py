"""``perceive benchmark``: a model over held-out world scenes, every task it supports, one report."""

from __future__ import annotations

import argparse
import json
import sys

from perceive.commands import CliError


def cmd_benchmark(args: argparse.Namespace) -> int:
    from perceive.eval import benchmark
    from perceive.eval.report import markdown
    from perceive.perceiver import load

    if args.suite != "world":
        raise CliError(f"unknown suite {args.suite!r}; known: world")
    try:  # checked before the model loads
        benchmark.held_out_seed(args.split, args.n)
    except ValueError as e:
        raise CliError(f"--n: {e}") from None
    from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver

    try:
        perceiver = load(args.model)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    if not isinstance(perceiver, ChatRexPerceiver):
        raise CliError(f"the world suite measures retrieval (ChatRex) models; {args.model} holds a "
                       f"{perceiver.model_type} model")  # fmt: skip
    report = benchmark.run(perceiver, n=args.n, progress=not args.quiet, split=args.split)
    if args.out:
        benchmark.write(report, args.out)
    if args.json:
        json.dump(report.metrics, sys.stdout, default=float)
        print()
    else:
        sys.stdout.write(markdown(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("benchmark", help="run a model over held-out world scenes; every task, one report")
    b.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    b.add_argument("--suite", default="world")
    b.add_argument("--n", type=int, default=100, help="number of held-out scenes")
    b.add_argument("--split", choices=("test", "validation"), default="test",
                   help="which held-out scenes: choose between models on validation, report on test")  # fmt: skip
    b.add_argument("--out", help="write benchmark.json and benchmark.md here")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_benchmark)
