"""``perceive demo``: the main job, a trained model on fresh world scenes and the world itself (``perceive.demo``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perceive.commands import CliError


def cmd_demo(args: argparse.Namespace) -> int:
    from perceive.demo import model_part, world_part
    from perceive.perceiver import DEFAULT_MODEL

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ["# perceive demo", ""]
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    has_model = (model_dir / "model.safetensors").is_file()
    if has_model:
        try:
            report += model_part(out, str(model_dir), args.questions_scenes, args.size)
        except (FileNotFoundError, ValueError) as e:  # a folder that is not a perceive model: one line
            raise CliError(str(e)) from None
    else:
        report += [f"No trained model at {model_dir}: train one with `perceive train --config tiny --out DIR`.", ""]
    report += world_part(out, args.scenes, args.size)
    (out / "README.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'README.md'} with {'answers, pictures and ' if has_model else ''}a world contact sheet")
    if args.json:
        json.dump({"out": str(out), "model": str(model_dir) if has_model else None}, sys.stdout)
        print()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the main job: a trained model on fresh world scenes, and the world itself")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    d.add_argument("--scenes", type=int, default=8, help="scenes in the world contact sheet")
    d.add_argument("--questions-scenes", type=int, default=3, help="scenes the model is asked about")
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
