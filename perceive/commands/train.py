"""``perceive train --config NAME --out DIR``: a model from scratch; the same command resumes a killed run."""

from __future__ import annotations

import argparse

from perceive.commands import CliError


def cmd_train(args: argparse.Namespace) -> int:
    from perceive.train.checkpoint import CheckpointError
    from perceive.train.trainer import RECIPES, train

    if args.config not in RECIPES:
        raise CliError(f"unknown config {args.config!r}; known: {', '.join(RECIPES)}")
    try:
        out = train(args.config, args.out, progress=not args.quiet, stop_after=args.stop_after)
    except CheckpointError as e:  # nothing usable to resume from: say which files, not a traceback
        raise CliError(str(e)) from None
    model = out / "model"
    if model.is_dir():
        print(f"trained model in {model} (loss curve: {out / 'loss_curve.png'})")
    else:
        print(f"stopped early; run the same command again to resume from {out / 'checkpoints'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model from scratch on the synthetic world (resumes if interrupted)")
    t.add_argument("--config", default="tiny", help="training recipe: tiny (default) or smoke")
    t.add_argument("--out", required=True, help="output folder (checkpoints, logs, the final model)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop each phase after this many steps in this run (run again to resume)")  # fmt: skip
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
