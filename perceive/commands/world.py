"""``perceive world generate``."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from perceive.commands import CliError

if TYPE_CHECKING:
    from perceive.world.generator import WorldConfig


def _config(args: argparse.Namespace) -> WorldConfig:
    from perceive.world.generator import WorldConfig

    cfg = WorldConfig(
        size=args.size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        person_share=args.person_share,
        distractor_similarity=args.distractor_similarity,
        relation_depth=args.relation_depth,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from perceive.world.export import write_dataset

    cfg = _config(args)
    if args.n < 1:
        raise CliError(f"--n must be >= 1, got {args.n}")
    if args.seed < 0:
        raise CliError(f"--seed must be >= 0, got {args.seed}")
    try:
        out = write_dataset(args.out, args.n, args.seed, cfg, overwrite=args.overwrite, progress=not args.quiet)
    except (FileExistsError, ValueError, OSError) as e:
        raise CliError(str(e)) from None
    print(f"wrote {args.n} scenes to {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    world = sub.add_parser("world", help="the synthetic scene world")
    wsub = world.add_subparsers(dest="world_command", required=True, metavar="COMMAND", parser_class=type(world))
    g = wsub.add_parser("generate", help="write N scenes with annotations in COCO, HumanRef, RefCOCO formats")
    g.add_argument("--n", type=int, required=True, help="number of scenes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    g.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    g.add_argument("--min-objects", type=int, default=3)
    g.add_argument("--max-objects", type=int, default=8)
    g.add_argument("--person-share", type=float, default=0.3)
    g.add_argument("--distractor-similarity", type=float, default=0.3)
    g.add_argument("--relation-depth", type=int, default=1, choices=[1, 2])
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
