"""The ``perceive`` command. Each subcommand is a plain function taking the parsed arguments."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


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


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line (with where to look for help), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="perceive", description="Perception MLLMs on CPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("parse", help="parse model output text read on stdin; print JSON")
    p.add_argument("--format", required=True, choices=["chatrex", "refvlm", "mvp", "coords", "qwen-json"])
    p.add_argument(
        "--num-boxes",
        type=_positive_int,
        default=None,
        help="number of input boxes (chatrex): larger indices are reported as problems",
    )
    p.add_argument("--units", choices=["pixels", "bins"], default="pixels", help="coordinate units (coords)")
    p.set_defaults(func=cmd_parse)

    from perceive import demo
    from perceive.eval import cli as eval_cli
    from perceive.models import cli as model_cli
    from perceive.world import cli as world_cli

    world_cli.add_commands(sub)
    eval_cli.add_commands(sub)
    model_cli.add_commands(sub)
    demo.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars say nothing to a command-line user
    hf_logging.set_verbosity_error()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"perceive {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"perceive {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run through the imported module so that ``CliError`` is the one the subcommands raise.
    from perceive.cli import main as _main

    raise SystemExit(_main())
