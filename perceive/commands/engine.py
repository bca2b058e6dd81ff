"""``perceive engine run``: ChatRex's data engine over unlabelled images (``perceive.engine``)."""

from __future__ import annotations

import argparse

from perceive.commands import CliError


def cmd_run(args: argparse.Namespace) -> int:
    from perceive.engine import EngineConfig
    from perceive.engine.run import EngineFolderError, run

    for flag, value in (("--workers", args.workers), ("--limit", args.limit)):
        if value is not None and value < 1:
            raise CliError(f"{flag} must be >= 1, got {value}")
    try:
        config = EngineConfig(model=args.model, caption_kind=args.caption, min_score=args.min_score,
                              verify=not args.no_verify, batch_size=args.batch_size)  # fmt: skip
    except ValueError as e:
        raise CliError(str(e).replace("min_score", "--min-score").replace("batch_size", "--batch-size")) from None
    try:
        summary = run(args.images, args.out, config, continue_run=args.continue_run, ray=args.ray,
                      progress=not args.quiet, limit=args.limit, workers=args.workers, draw=args.draw)  # fmt: skip
    except (EngineFolderError, FileNotFoundError, ImportError, ValueError) as e:
        raise CliError(str(e)) from None
    regions = summary["regions"]
    dropped = ", ".join(f"{rule} {n}" for rule, n in regions["dropped"].items())
    phrases = ", ".join(f"{rule} {n}" for rule, n in summary["phrases"]["dropped"].items()) or "none"
    errors = ", ".join(f"{stage} {n}" for stage, n in summary["errors"].items()) or "none"
    print(
        f"images: {summary['images']} ({summary['annotated']} annotated, {summary['skipped_as_done']} already done; "
        f"errors: {errors})"
    )
    print(f"phrases kept: {summary['phrases']['kept']} (dropped: {phrases})")
    print(f"regions grounded: {regions['grounded']}, kept: {regions['kept']} (dropped: {dropped})")
    rejected = sum(summary["expressions_dropped"].values())
    print(f"referring expressions: {summary['expressions']} (dropped by the check: {rejected})")
    print("seconds per image: " + ", ".join(f"{s} {t}" for s, t in summary["seconds_per_image"].items()))
    print(
        f"wrote {args.out}/annotations.jsonl, instances.json, referring.jsonl; train on it with "
        f"perceive train --data {args.out}/spec.json"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    engine = sub.add_parser("engine", help="the data engine: unlabelled images in, grounded annotations out")
    esub = engine.add_subparsers(dest="engine_command", required=True, metavar="COMMAND", parser_class=type(engine))
    r = esub.add_parser("run", help="caption, ground, describe, filter and rewrite; resumable")
    r.add_argument("--images", required=True, help='a folder of images or a JSONL of {"image": path} lines')
    r.add_argument("--out", required=True, help="output folder (run again to resume)")
    r.add_argument("--model", default=None, help="the model folder of the default parts (default: the shipped one)")
    r.add_argument("--caption", default="caption_brief", choices=["caption_brief", "caption_detailed"])
    r.add_argument("--min-score", type=float, default=0.3, help="drop groundings below this confidence")
    r.add_argument("--no-verify", action="store_true", help="keep expressions without grounding them again")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--limit", type=int, default=None, help="only the first N images")
    r.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run on Ray Data: 'auto' starts a local cluster, an address joins one")  # fmt: skip
    r.add_argument("--workers", type=int, default=1, help="with --ray: actors per stage")
    r.add_argument("--continue", dest="continue_run", action="store_true",
                   help="add to a folder that holds another run's output")  # fmt: skip
    r.add_argument("--draw", action="store_true", help="a picture of each image's regions in OUT/annotated/")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
