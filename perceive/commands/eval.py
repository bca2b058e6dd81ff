"""``perceive eval METRIC --gt FILE --pred FILE [--out DIR] [--json] [--strict]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perceive.commands import CliError


def cmd_eval(args: argparse.Namespace) -> int:
    from perceive.data.readers import FormatError
    from perceive.eval import report as rep
    from perceive.eval.inputs import Problems
    from perceive.eval.runners import HANDLERS

    problems = Problems(strict=args.strict)
    try:
        report, plots = HANDLERS[args.metric](args, problems)
    except (FormatError, FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    stdout = report.metrics.pop("_stdout", None)
    report.metrics["skipped"] = problems.to_json()
    if problems.skipped:
        report.notes.append(
            f"skipped {problems.skipped} bad prediction records: {dict(problems.reasons)} (e.g. {problems.examples[0]})"
        )
    if args.out:
        rep.write(report, args.out, **plots)
    if args.json:
        obj = stdout if stdout is not None else {k: v for k, v in report.metrics.items() if k != "pr_curve"}
        json.dump(obj, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(rep.markdown(report))
        if args.out:
            print(f"\nwrote {Path(args.out) / 'report.md'} and {Path(args.out) / 'metrics.json'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from perceive.eval.runners import METRICS

    e = sub.add_parser(
        "eval",
        help="score predictions with the field's metrics",
        description="\n".join(f"{k}: {v}" for k, v in METRICS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("metric", choices=list(METRICS))
    e.add_argument("--gt", required=True, help="ground-truth file")
    e.add_argument("--pred", required=True, help="predictions file")
    e.add_argument("--out", help="write metrics.json, report.md and plots here")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.add_argument("--strict", action="store_true", help="fail on the first bad prediction record")
    e.add_argument("--iou-type", choices=["bbox", "segm"], default="bbox")
    e.add_argument("--iou", type=float, default=0.5, help="IoU threshold (pr)")
    e.add_argument("--instances", help="COCO instances with the boxes refs point at (rec)")
    e.add_argument("--gt-dir", help="ground-truth panoptic PNG folder (panoptic)")
    e.add_argument("--pred-dir", help="predicted panoptic PNG folder (panoptic)")
    e.set_defaults(func=cmd_eval)
