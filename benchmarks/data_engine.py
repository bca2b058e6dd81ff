"""The data engine's annotations against the world's exact truth, and its speed here and on Ray.

    python benchmarks/data_engine.py [--split validation] [--n 100] [--caption caption_brief] [--ray]
                                     [--out benchmarks/results/engine_validation]

Runs ``perceive engine run`` (the shipped model's default parts) over ``n`` held-out world scenes of ``split``
(the benchmark's scenes: ``perceive.eval.benchmark.held_out_seed``) and scores every region it grounded:

- right: its box matches an object at IoU >= 0.5 that its phrase describes, per the world's own checker
  (``perceive.world.checker``; the phrase's leading article or number dropped). A phrase the checker cannot
  read is wrong.
- phrase grounding precision (right kept regions / kept regions) and recall (objects, parts aside, found by a
  right kept region / objects);
- region-category accuracy (kept regions matching an object: category caption == the object's category);
- referring expressions that select exactly their region (the checker's answer is the region's object alone);
- what each filter drops, right and wrong, beside what is kept (for the referring check: expressions, right
  when the checker's answer is the region's object alone).

``--captions truth`` plugs in a captioner that returns each scene's true brief caption (the world's, with its
phrase spans): what the stages after captioning make of a perfect caption, apart from the captioner.

With ``--ray`` the same images run again on a local Ray cluster; seconds per image per stage and images per
second of both runs are printed (each stage's seconds are its share of a batch's time, so stages that run at
once on Ray add up to more than the wall time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from perceive.boxes import pair_iou
from perceive.engine import EngineConfig, EngineParts
from perceive.engine.phrases import Phrase
from perceive.engine.run import run
from perceive.engine.stages import DROP_RULES
from perceive.eval.benchmark import held_out_seed
from perceive.world import checker
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe
from perceive.world.scene import Scene

_LEAD = re.compile(r"^(?:a|an|the|one|two|three|four|five|some)\s+", re.IGNORECASE)


def describes(scene: Scene, phrase: str) -> list[int]:
    """The objects the world's checker says ``phrase`` describes ([] when it cannot read it)."""
    try:
        return checker.answer(scene, _LEAD.sub("", phrase.strip()))
    except (checker.ParseError, ValueError, KeyError, IndexError):
        return []


def matched_object(scene: Scene, box: list[float]) -> int | None:
    best = max(scene.objects, key=lambda o: pair_iou(list(o.box), box))
    return best.id if pair_iou(list(best.box), box) >= 0.5 else None


def score(results: list[dict], scenes: dict[str, Scene]) -> dict:
    kept = right_kept = cat_total = cat_right = expr_total = expr_right = 0
    found: set[tuple[str, int]] = set()
    by_rule = {rule: [0, 0] for rule in (*DROP_RULES, "kept")}  # rule -> [right, wrong] regions
    by_expression = {"not_regrounded": [0, 0]}  # rule -> [right, wrong] expressions it dropped
    objects = sum(1 for s in scenes.values() for o in s.objects if o.is_instance)
    for item in results:
        if "error" in item:
            continue
        scene = scenes[item["id"]]
        for r in item["regions"]:
            obj = matched_object(scene, r["box"])
            right = obj is not None and obj in describes(scene, r["phrase"])
            by_rule[r["dropped"] or "kept"][0 if right else 1] += 1
            if r["dropped"] is not None:
                continue
            kept += 1
            right_kept += right
            if right and scene.get(obj).is_instance:
                found.add((item["id"], obj))
            if obj is not None:
                cat_total += 1
                cat_right += r.get("category", "").strip().lower() == scene.get(obj).category
            if r.get("expression"):
                expr_total += 1
                expr_right += obj is not None and describes(scene, r["expression"]) == [obj]
            if r.get("expression_dropped"):
                good = obj is not None and describes(scene, r["rejected_expression"]) == [obj]
                by_expression[r["expression_dropped"]][0 if good else 1] += 1
    return {
        "regions kept": kept,
        "grounding precision@0.5": right_kept / max(kept, 1),
        "grounding recall@0.5 (objects)": len(found) / max(objects, 1),
        "region category accuracy": cat_right / max(cat_total, 1),
        "referring expressions exact": expr_right / max(expr_total, 1),
        "referring expressions": expr_total,
        "by rule (right, wrong)": by_rule,
        "expressions dropped (right, wrong)": by_expression,
    }


class TruthCaptioner:
    """Each image's true brief caption, found by its pixels (the engine hands a captioner images only)."""

    def __init__(self, scenes: list[Scene], cfg: WorldConfig) -> None:
        self.captions = {}
        for scene in scenes:
            cap = next(c for c in describe(scene, cfg).captions if c.kind == "caption_brief")
            spans = [Phrase(p["phrase"], (p["span"][0], p["span"][1])) for p in cap.phrases]
            self.captions[hashlib.sha1(scene.image.tobytes()).hexdigest()] = (cap.text, spans)

    def __call__(self, images: list[np.ndarray]) -> list[tuple[str, list[Phrase] | None]]:
        return [self.captions[hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()] for im in images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--caption", default="caption_brief", choices=["caption_brief", "caption_detailed"])
    ap.add_argument("--min-score", type=float, default=0.3)
    ap.add_argument("--captions", default="model", choices=["model", "truth"], help="who captions the images")
    ap.add_argument("--ray", action="store_true", help="also run on a local Ray cluster and compare speed")
    ap.add_argument("--out", default=None, help="folder for report.json (default: print only)")
    args = ap.parse_args()

    first = held_out_seed(args.split, args.n)
    cfg = WorldConfig(size=256, person_share=0.35, relation_depth=2)  # the benchmark's world
    config = EngineConfig(caption_kind=args.caption, min_score=args.min_score)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        scenes = {}
        for i in range(args.n):
            scene = generate_scene(first + i, cfg)
            scenes[f"scene{i:04d}"] = scene
            Image.fromarray(scene.image).save(folder / f"scene{i:04d}.png")
        runs = {}
        truth = args.captions == "truth"
        parts = EngineParts(captioner=TruthCaptioner(list(scenes.values()), cfg)) if truth else None
        for name, ray in [("local", None), *([("ray", "auto")] if args.ray else [])]:
            start = time.perf_counter()
            summary = run(folder, Path(tmp) / name, config, parts, ray=ray, progress=False)
            summary["wall seconds"] = time.perf_counter() - start
            runs[name] = summary
        results = [json.loads(line) for line in (Path(tmp) / "local" / "results.jsonl").open()]
    report = {"split": args.split, "n": args.n, "caption": args.caption, "captions": args.captions,
              "min_score": args.min_score,
              **score(results, scenes), "runs": runs}  # fmt: skip

    who = "the world's true captions" if args.captions == "truth" else args.caption
    print(f"## Engine vs truth: {args.n} {args.split} scenes, {who}, min score {args.min_score}\n")
    print("| measure | value |\n|---|---|")
    for key in ("grounding precision@0.5", "grounding recall@0.5 (objects)", "region category accuracy",
                "referring expressions exact"):  # fmt: skip
        print(f"| {key} | {100 * report[key]:.1f} |")
    print(f"| regions kept / referring expressions | {report['regions kept']} / {report['referring expressions']} |")
    print("\n| regions | right | wrong |\n|---|---|---|")
    for rule, (right, wrong) in report["by rule (right, wrong)"].items():
        print(f"| {'kept' if rule == 'kept' else 'dropped: ' + rule} | {right} | {wrong} |")
    for rule, (right, wrong) in report["expressions dropped (right, wrong)"].items():
        print(f"| expressions dropped: {rule} | {right} | {wrong} |")
    print("\n| run | images/s | " + " | ".join(f"{s} s/image" for s in runs["local"]["seconds_per_image"]) + " |")
    print("|---" * (2 + len(runs["local"]["seconds_per_image"])) + "|")
    for name, summary in runs.items():
        per = summary["seconds_per_image"]
        print(
            f"| {name} | {args.n / summary['wall seconds']:.2f} | "
            + " | ".join(f"{per.get(s, 0):.3f}" for s in runs["local"]["seconds_per_image"])
            + " |"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
