"""``perceive world generate`` and ``perceive demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perceive.world.generator import WorldConfig


def _config(args: argparse.Namespace) -> WorldConfig:
    from perceive.cli import CliError

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
    from perceive.cli import CliError
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Until a trained model ships: show the world, its tasks and the answer formats."""
    from perceive.formats import chatrex, refvlm
    from perceive.world.generator import generate_scene
    from perceive.world.language import describe
    from perceive.world.sheet import contact_sheet, draw_scene

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = WorldConfig(size=args.size, person_share=0.4, relation_depth=2)
    panels, report = [], ["# perceive demo: the synthetic world", ""]
    for seed in range(args.scenes):
        scene = generate_scene(seed, cfg)
        lang = describe(scene, cfg)
        panels.append(draw_scene(scene, lang))
        ids = [o.id for o in scene.instances]  # the "proposals": object k is <objk>
        report += [f"## scene {seed}", "", f"![scene {seed}](scene_{seed}.png)", ""]
        draw_scene(scene, lang, n_expressions=4).save(out / f"scene_{seed}.png")
        for e in lang.expressions[:6]:
            answer = chatrex.render_groups([(e.text, [ids.index(i) for i in e.answer])])
            report.append(f"- *{e.domain}/{e.sub_domain}*: `{answer}`")
        cap = lang.captions[0]
        groups = [
            chatrex.GroundedPhrase(p["phrase"], tuple(ids.index(i) for i in p["objects"]), tuple(p["span"]))
            for p in cap.phrases
        ]
        report.append(f"- *grounded caption*: `{chatrex.render(cap.text, groups)}`")
        first = cap.phrases[0]
        trip = refvlm.Triplet(
            first["phrase"],
            tuple(first["span"]),
            (refvlm.UnitGroup(("box",), tuple(range(len(first["objects"]))), ()),),
        )
        report.append(f"- *REF-VLM triplet*: `{refvlm.render(cap.text, [trip])}`")
        for q in lang.questions[:3]:
            report.append(f"- *{q.kind}*: {q.question} → {q.answer}")
        report.append("")
    contact_sheet(panels, columns=min(4, len(panels))).save(out / "contact_sheet.png")
    (out / "README.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'contact_sheet.png'} and {out / 'README.md'}")
    print("No trained model ships yet: this demo shows the world and the answer formats.")
    if args.json:
        json.dump({"out": str(out), "scenes": args.scenes}, sys.stdout)
        print()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
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

    d = sub.add_parser("demo", help="the main job: show the world, tasks and formats")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--scenes", type=int, default=8)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
