"""``perceive compare``: index answers versus coordinate text, trained and measured side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perceive.commands import CliError


def cmd_compare(args: argparse.Namespace) -> int:
    from perceive import compare
    from perceive.models.upn.modeling_upn import UpnModel
    from perceive.perceiver import DEFAULT_MODEL

    upn_dir = Path(args.upn) if args.upn else DEFAULT_MODEL / "upn"
    if not (upn_dir / "model.safetensors").is_file():
        raise CliError(f"no trained UPN at {upn_dir} (train one with perceive train, or pass --upn)")
    cfg = compare.CompareConfig(steps=args.steps, eval_scenes=args.eval_scenes, batch_size=args.batch_size)
    report = compare.run(cfg, args.out, UpnModel.from_pretrained(str(upn_dir)), progress=not args.quiet)
    sys.stdout.write(compare.markdown(report))
    print(f"\nwrote {Path(args.out) / 'comparison.json'} and comparison.png")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="index answers versus coordinate text: train both, measure both")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=800, help="training steps for each model")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--eval-scenes", type=int, default=60)
    c.add_argument("--upn", default=None, help="a trained UPN folder (default: checkpoints/tiny/upn)")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_compare)
