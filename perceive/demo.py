"""The main job (``perceive demo``): a trained model answering questions about fresh world scenes, with
annotated pictures and a short report; and a contact sheet of the world with its language."""

from __future__ import annotations

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
    from perceive.data.templates import CHATREX_TEMPLATES
    from perceive.perceiver import load
    from perceive.world.generator import generate_scene
    from perceive.world.language import describe

    perceiver = load(model)
    cfg = WorldConfig(size=size, person_share=0.4, relation_depth=2)
    report = ["## The model's answers", ""]
    for seed in range(scenes):
        scene = generate_scene(DEMO_SEED + 1000 + seed, cfg)
        lang = describe(scene, cfg)
        cats = sorted({o.category for o in scene.instances})[:3]
        questions = [CHATREX_TEMPLATES["detect"].format(obj="; ".join(cats))]
        questions += [CHATREX_TEMPLATES["detect"].format(obj=e.text) for e in lang.expressions[:3]]
        counts = [q for q in lang.questions if q.kind == "count"][:1]
        phrases = [q.question.removeprefix("How many ").removesuffix(" are there?") for q in counts]
        questions += [CHATREX_TEMPLATES["count"].format(obj=phrase) for phrase in phrases]
        questions.append(CHATREX_TEMPLATES["caption_brief"])
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
