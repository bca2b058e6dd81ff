"""``perceive benchmark``: a model over held-out world scenes, every task it supports, one report; with
``--data SPEC``, over annotation files instead, the measures the data supports (``perceive.eval.file_benchmark``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from perceive.commands import CliError, add_device_option

if TYPE_CHECKING:
    from perceive.eval.report import Report

WORLD_SCENES = 100  # --n's default for the world suite; a data spec is measured whole by default
DEFAULT_SCORE_THRESHOLD = 0.3  # perceive.eval.file_benchmark.SCORE_THRESHOLD, not imported: --help stays light


def _load_data(args: argparse.Namespace) -> Any:
    try:
        from perceive.data.spec import load_spec
    except ImportError as e:
        if e.name == "perceive.data.spec":
            raise CliError("--data: the data spec reader (perceive.data.spec) is not available yet") from None
        raise CliError(f"--data: {e}") from None  # a package the reader needs is missing
    try:
        spec = load_spec(args.data, strict=args.strict)
    except (OSError, ValueError) as e:  # a readers' FormatError is a ValueError
        raise CliError(f"--data: {e}") from None
    if not args.quiet:
        print(spec.summary(), file=sys.stderr)
    return spec


def _data_benchmark(args: argparse.Namespace) -> Report:
    from perceive.eval import file_benchmark

    if args.split is not None:
        raise CliError("--split chooses held-out world scenes; with --data, name the split's files in the spec")
    if args.n is not None and args.n < 1:
        raise CliError(f"--n: at least 1 record of each source, got {args.n}")
    threshold = DEFAULT_SCORE_THRESHOLD if args.score_threshold is None else args.score_threshold
    if not 0.0 <= threshold <= 1.0:
        raise CliError(f"--score-threshold: a score in [0, 1], got {threshold}")
    spec = _load_data(args)
    perceiver = _load_any_model(args.model, args.device)
    from perceive.models.mvp.perceiver_mvp import MvpPerceiver

    if isinstance(perceiver, MvpPerceiver):
        from perceive.eval import mvp_benchmark

        records = [source.record(i) for source in spec.sources for i in range(min(len(source), args.n or len(source)))]
        return mvp_benchmark.run(perceiver, records, progress=not args.quiet, name="data")
    from perceive.models.refvlm.perceiver_refvlm import RefVlmPerceiver

    if isinstance(perceiver, RefVlmPerceiver):
        from perceive.eval import refvlm_benchmark

        records = [source.record(i) for source in spec.sources for i in range(min(len(source), args.n or len(source)))]
        return refvlm_benchmark.run(perceiver, records, progress=not args.quiet, name="data")
    from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver

    if not isinstance(perceiver, ChatRexPerceiver):
        raise CliError(f"the file benchmark measures ChatRex, MVP-LM and REF-VLM models; {args.model} holds a "
                       f"{perceiver.model_type} model")  # fmt: skip
    return file_benchmark.run(perceiver, spec.sources, n=args.n, granularity=args.granularity or "both",
                              score_threshold=threshold, progress=not args.quiet)  # fmt: skip


def _world_benchmark(args: argparse.Namespace) -> Report:
    from perceive.eval import benchmark

    if args.suite != "world":
        raise CliError(f"unknown suite {args.suite!r}; known: world")
    for flag, value in (("--granularity", args.granularity), ("--score-threshold", args.score_threshold),
                        ("--strict", args.strict or None)):  # fmt: skip
        if value is not None:
            raise CliError(f"{flag} is an option of --data, not of the world suite")
    split = args.split or "test"
    n = WORLD_SCENES if args.n is None else args.n
    try:  # checked before the model loads
        benchmark.held_out_seed(split, n)
    except ValueError as e:
        raise CliError(f"--n: {e}") from None
    perceiver = _load_any_model(args.model, args.device)
    from perceive.models.mvp.perceiver_mvp import MvpPerceiver

    if isinstance(perceiver, MvpPerceiver):
        from perceive.data.sources.world import WorldSource
        from perceive.eval import mvp_benchmark
        from perceive.world.generator import WorldConfig

        source = WorldSource(WorldConfig(size=256, person_share=0.35, relation_depth=2), masks=True)
        first = benchmark.held_out_seed(split, n)
        records = [source.record(first + i) for i in range(n)]
        return mvp_benchmark.run(perceiver, records, progress=not args.quiet, name=f"world {split}")
    from perceive.models.refvlm.perceiver_refvlm import RefVlmPerceiver

    if isinstance(perceiver, RefVlmPerceiver):
        from perceive.data.sources.world import WorldSource
        from perceive.eval import refvlm_benchmark
        from perceive.train.refvlm import RefVlmRecipe
        from perceive.world.generator import WorldConfig

        source = WorldSource(WorldConfig(**RefVlmRecipe().world), masks=True)
        first = benchmark.held_out_seed(split, n)
        records = [source.record(first + i) for i in range(n)]
        # the keypoint baseline's mean pose: training scenes' persons (the world's first seeds), never the measured
        template = [source.record(i) for i in range(refvlm_benchmark.TEMPLATE_RECORDS)]
        return refvlm_benchmark.run(perceiver, records, progress=not args.quiet, name=f"world {split}",
                                    template_records=template)  # fmt: skip
    from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver

    if not isinstance(perceiver, ChatRexPerceiver):
        raise CliError(f"the world suite measures ChatRex, MVP-LM and REF-VLM models; {args.model} holds a "
                       f"{perceiver.model_type} model")  # fmt: skip
    return benchmark.run(perceiver, n=n, progress=not args.quiet, split=split)


def _load_any_model(path: str | None, device: str = "cpu") -> Any:
    from perceive.perceiver import load

    try:
        return load(path, device)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None


def cmd_benchmark(args: argparse.Namespace) -> int:
    from perceive.eval import benchmark
    from perceive.eval.report import markdown

    report = _data_benchmark(args) if args.data else _world_benchmark(args)
    if args.out:
        benchmark.write(report, args.out)
    if args.json:
        json.dump(report.metrics, sys.stdout, default=float)
        print()
    else:
        sys.stdout.write(markdown(report))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("benchmark", help="run a model over held-out world scenes or annotation files; one report")
    b.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    add_device_option(b)
    b.add_argument("--suite", default="world")
    b.add_argument("--data", metavar="SPEC", help="benchmark on annotation files instead: a world export folder or a "
                                                  "data spec (JSON/YAML)")  # fmt: skip
    b.add_argument("--n", type=int, default=None,
                   help=f"number of held-out scenes (default {WORLD_SCENES}); with --data, the first N records of "
                        f"each source (default: all)")  # fmt: skip
    b.add_argument("--split", choices=("test", "validation"), default=None,
                   help="which held-out world scenes (default test): choose between models on validation, report on "
                        "test")  # fmt: skip
    b.add_argument("--granularity", choices=("coarse", "fine", "both"), default=None,
                   help="with --data: the UPN proposals the questions are asked with (default both; ChatRex's "
                        "reported numbers use fine)")  # fmt: skip
    b.add_argument("--score-threshold", type=float, default=None,
                   help=f"with --data: the maintainers' protocol drops objects scoring under this (default "
                        f"{DEFAULT_SCORE_THRESHOLD})")  # fmt: skip
    b.add_argument("--strict", action="store_true", help="with --data: stop at the first bad annotation")
    b.add_argument("--out", help="write benchmark.json and benchmark.md here")
    b.add_argument("--json", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_benchmark)
