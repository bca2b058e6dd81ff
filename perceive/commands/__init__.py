"""The ``perceive`` command's subcommands, one module each: a plain ``cmd_*`` function of the parsed
arguments and an ``add_parser`` that registers it. ``perceive.cli`` assembles them; they never import it."""

import argparse


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: auto (CUDA, else Apple's MPS, else the CPU), cuda, cuda:N, mps "
                             "or cpu (default); bf16 autocast on CUDA")  # fmt: skip
