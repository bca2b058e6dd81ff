"""How fast the world renders, and what its language looks like.

    python benchmarks/world_speed.py [--n 400] [--size 256]

Prints (1) scenes per second on one core for each stage, with the ratio to the 200 scenes/s aim and
to the rendering-only stage measured in the same run, and (2) the distribution of expression
domains, answer counts and question kinds over the same scenes.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the issue asks

import argparse
import collections
import time

from perceive.world.export import coco_annotations, humanref_records, panoptic_segments
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe

AIM = 200.0


def bucket(n: int) -> str:
    if n == 0:
        return "0 (rejection)"
    if n == 1:
        return "1"
    if n <= 5:
        return "2-5"
    return "6-10" if n <= 10 else ">10"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--person-share", type=float, default=0.3)
    args = ap.parse_args()
    cfg = WorldConfig(size=args.size, person_share=args.person_share, relation_depth=2)

    t0 = time.perf_counter()
    scenes = [generate_scene(i, cfg) for i in range(args.n)]
    t_render = time.perf_counter() - t0
    t0 = time.perf_counter()
    langs = [describe(s, cfg) for s in scenes]
    t_lang = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i, (s, lang) in enumerate(zip(scenes, langs, strict=True)):
        coco_annotations(s, i + 1)
        panoptic_segments(s)
        humanref_records(s, lang, i + 1, "x.png")
    t_export = time.perf_counter() - t0

    render_rate = args.n / t_render
    rows = [
        ("render (image, masks, depth)", t_render),
        ("+ language (all tasks)", t_render + t_lang),
        ("+ annotations (COCO RLE, panoptic, HumanRef)", t_render + t_lang + t_export),
    ]
    print(f"World speed, {args.n} scenes at {args.size}px, one core")
    print(f"| stage | scenes/s | vs aim {AIM:.0f}/s | vs render only |")
    print("|---|---|---|---|")
    for name, t in rows:
        rate = args.n / t
        print(f"| {name} | {rate:.0f} | {rate / AIM:.2f}x | {rate / render_rate:.2f}x |")

    domains: collections.Counter = collections.Counter()
    answers: collections.Counter = collections.Counter()
    questions: collections.Counter = collections.Counter()
    objects = persons = parts = 0
    for s, lang in zip(scenes, langs, strict=True):
        objects += len(s.instances)
        persons += len(s.of_kind("person"))
        parts += len(s.of_kind("part"))
        for e in lang.expressions:
            domains[(e.domain, e.sub_domain)] += 1
            answers[bucket(len(e.answer))] += 1
        for q in lang.questions:
            questions[q.kind] += 1
    total = sum(domains.values())
    print(
        f"\nPer scene: {objects / args.n:.1f} instances ({persons / args.n:.1f} persons), "
        f"{parts / args.n:.1f} parts, {total / args.n:.1f} referring expressions"
    )
    print("\n| domain | sub-domain | expressions | share |\n|---|---|---|---|")
    for (d, sd), c in sorted(domains.items()):
        print(f"| {d} | {sd} | {c} | {c / total:.1%} |")
    print("\n| answer objects | expressions | share |\n|---|---|---|")
    for b in ("0 (rejection)", "1", "2-5", "6-10", ">10"):
        print(f"| {b} | {answers[b]} | {answers[b] / total:.1%} |")
    print("\n| question kind | count |\n|---|---|")
    for k, c in sorted(questions.items()):
        print(f"| {k} | {c} |")


if __name__ == "__main__":
    main()
