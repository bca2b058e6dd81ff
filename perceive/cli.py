"""The ``perceive`` command: the parser, assembled from ``perceive.commands`` (a module per subcommand, each a
plain function taking the parsed arguments)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from perceive.commands import CliError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes print one line (with where to look for help), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from perceive.commands import ask, benchmark, compare, convert, demo, engine, eval, info, parse, serve, train, world

    parser = _Parser(prog="perceive", description="Perception MLLMs on CPU.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for command in (parse, world, eval, benchmark, compare, serve, train, ask, info, demo, engine, convert):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # weight-loading bars and advisory warnings say nothing to a command-line user; set before transformers is
    # imported (it reads them then), so a command that loads no model does not pay for importing it here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (main called in-process): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
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
    raise SystemExit(main())
