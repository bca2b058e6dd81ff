"""``perceive parse --format F``: model output text on stdin, its parse as JSON on stdout."""

from __future__ import annotations

import argparse
import json
import sys


def cmd_parse(args: argparse.Namespace) -> int:
    from perceive.formats import chatrex, coords, mvp, refvlm

    text = sys.stdin.read()
    if args.format == "chatrex":
        result = chatrex.parse(text, args.num_boxes).to_json()
    elif args.format == "refvlm":
        result = refvlm.parse(text).to_json()
    elif args.format == "mvp":
        r = mvp.parse_response(text)
        result = {"caption": r.caption, "per_offset": r.per_offset, "problems": list(r.problems)}
    elif args.format == "coords":
        result = coords.parse(text, units=args.units).to_json()
    else:  # "qwen-json"
        result = coords.parse_json(text).to_json()
    json.dump(result, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parse", help="parse model output text read on stdin; print JSON")
    p.add_argument("--format", required=True, choices=["chatrex", "refvlm", "mvp", "coords", "qwen-json"])
    p.add_argument("--num-boxes", type=_non_negative_int, default=None,
                   help="number of input boxes (chatrex): larger indices are reported as problems")  # fmt: skip
    p.add_argument("--units", choices=["pixels", "bins"], default="pixels", help="coordinate units (coords)")
    p.set_defaults(func=cmd_parse)
