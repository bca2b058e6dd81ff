"""``perceive demo``, the main job: a trained model answering questions about fresh world scenes,
with annotated pictures and a short report; and a contact sheet of the world with its language."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from perceive.world.generator import WorldConfig

DEMO_SEED = 424_242  # scenes no training recipe draws


def world_part(out: Path, scenes: int, size: int) -> list[str]:
    """The world, its expressions and the answer formats, drawn and written out."""
    from perceive.formats import chatrex
    from perceive.world.generator import generate_scene
    from perceive.world.language import describe
    from perceive.world.sheet import contact_sheet, draw_scene

    cfg = WorldConfig(size=size, person_share=0.4, relation_depth=2)
    panels, report = [], ["## The world", "", "![contact sheet](contact_sheet.png)", ""]
    for seed in range(scenes):
        scene = generate_scene(DEMO_SEED + seed, cfg)
        lang = describe(scene, cfg)
        panels.append(draw_scene(scene, lang))
        ids = [o.id for o in scene.instances]  # object k is <objk>
        for e in lang.expressions[:3]:
            answer = chatrex.render_groups([(e.text, [ids.index(i) for i in e.answer])])
            report.append(f"- scene {seed}, *{e.domain}/{e.sub_domain}*: `{answer}`")
    contact_sheet(panels, columns=min(4, len(panels))).save(out / "contact_sheet.png")
    return report


def model_part(out: Path, model: str | None, scenes: int, size: int) -> list[str]:
    """A trained model asked every kind of question about fresh scenes; pictures of its answers."""
    from perceive.data.tasks import TEMPLATES
    from perceive.perceiver import Perceiver
    from perceive.world.generator import generate_scene
    from perceive.world.language import describe

    perceiver = Perceiver.from_pretrained(model)
    cfg = WorldConfig(size=size, person_share=0.4, relation_depth=2)
    report = ["## The model's answers", ""]
    for seed in range(scenes):
        scene = generate_scene(DEMO_SEED + 1000 + seed, cfg)
        lang = describe(scene, cfg)
        cats = sorted({o.category for o in scene.instances})[:3]
        questions = [TEMPLATES["detect"].format(obj="; ".join(cats))]
        questions += [TEMPLATES["detect"].format(obj=e.text) for e in lang.expressions[:3]]
        counts = [q for q in lang.questions if q.kind == "count"][:1]
        questions += [TEMPLATES["count"].format(obj=q.question.removeprefix("How many ").removesuffix(" are there?"))
                      for q in counts]  # fmt: skip
        questions.append(TEMPLATES["caption_brief"])
        truths = ["", *[f"{len(e.answer)} object(s)" for e in lang.expressions[:3]],
                  *[q.answer for q in counts], ""]  # fmt: skip
        report += [f"### scene {seed}", ""]
        for j, (q, truth) in enumerate(zip(questions, truths, strict=True)):
            ans = perceiver.ask(scene.image, q)
            name = f"scene{seed}_q{j}.png"
            ans.draw(scene.image).save(out / name)
            report += [f"**Q:** {q}", "", f"**A:** `{ans.text}`" + (f" (truth: {truth})" if truth else ""), "",
                       f"![answer]({name})", ""]  # fmt: skip
    return report


def cmd_demo(args: argparse.Namespace) -> int:
    from perceive.perceiver import DEFAULT_MODEL

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ["# perceive demo", ""]
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    has_model = (model_dir / "model.safetensors").is_file()
    if has_model:
        report += model_part(out, str(model_dir), args.questions_scenes, args.size)
    else:
        report += [f"No trained model at {model_dir}: train one with `perceive train --config tiny --out DIR`.", ""]
    report += world_part(out, args.scenes, args.size)
    (out / "README.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'README.md'} with {'answers, pictures and ' if has_model else ''}a world contact sheet")
    if args.json:
        json.dump({"out": str(out), "model": str(model_dir) if has_model else None}, sys.stdout)
        print()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the main job: a trained model on fresh world scenes, and the world itself")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--model", default=None, help="model folder (default: the shipped checkpoints/tiny)")
    d.add_argument("--scenes", type=int, default=8, help="scenes in the world contact sheet")
    d.add_argument("--questions-scenes", type=int, default=3, help="scenes the model is asked about")
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
