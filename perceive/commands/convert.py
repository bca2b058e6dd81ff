"""``perceive convert IN.pth OUT.safetensors``: a PyTorch checkpoint's weights, read without running its
pickle, written once as safetensors (``perceive.models.pth``)."""

from __future__ import annotations

import argparse

from perceive.commands import CliError


def cmd_convert(args: argparse.Namespace) -> int:
    from perceive.models.pth import convert

    if not args.target.endswith(".safetensors"):
        raise CliError(f"the output must be a .safetensors file, got {args.target}")
    try:
        tensors, size = convert(args.source, args.target)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    print(f"wrote {args.target}: {tensors} tensors, {size / 2**20:.1f} MiB")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="a .pth checkpoint's weights to safetensors, never running its pickle")
    c.add_argument("source", help="the .pth file (read with torch.load(weights_only=True) only)")
    c.add_argument("target", help="the .safetensors file to write")
    c.set_defaults(func=cmd_convert)
