"""The loop ChatRex relies on: train on engine-labelled images and compare with the same images labelled by truth.

    python benchmarks/engine_loop.py [--scenes 2000] [--scale 0.2] [--work out/engine_loop]

1. ``--scenes`` world scenes (the benchmark's world; seeds far from the held-out ones) exported as files: the truth.
2. ``perceive engine run`` (the shipped model's default parts) over their images: the engine's labels.
3. The tiny recipe, every phase's steps times ``--scale`` (UPN, its refinement, each MLLM stage), trained from
   each (``perceive train --data``), with the same seeds.
4. ``perceive benchmark`` of both on the validation scenes; their tables side by side.

Every step resumes: run it again after a kill. Heavy: about 45 minutes at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from perceive.engine import EngineConfig
from perceive.engine.run import run
from perceive.train.trainer import RECIPES, train
from perceive.world.export import write_dataset
from perceive.world.generator import WorldConfig

SEED = 11  # export seed: scene seeds (11 << 20) + i, far from the held-out 987,654 onwards


def scaled(factor: float):
    tiny = RECIPES["tiny"]
    return dataclasses.replace(
        tiny, upn_steps=max(1, round(tiny.upn_steps * factor)),
        upn_refine_steps=max(1, round(tiny.upn_refine_steps * factor)),
        stages=[dataclasses.replace(s, steps=max(1, round(s.steps * factor))) for s in tiny.stages],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--n", type=int, default=100, help="validation scenes of the benchmark")
    ap.add_argument("--work", default="out/engine_loop")
    args = ap.parse_args()
    work = Path(args.work)
    truth = work / "truth_files"
    if not (truth / "world.json").is_file():
        write_dataset(truth, args.scenes, SEED, WorldConfig(size=256, person_share=0.35, relation_depth=2))
    summary = run(truth / "images", work / "engine_files", EngineConfig())
    print(json.dumps(summary, indent=1))
    recipe = scaled(args.scale)
    tables = {}
    for name, data in (("truth", truth), ("engine", work / "engine_files" / "spec.json")):
        model = train(recipe, work / f"model_{name}", data=data) / "model"  # train returns the run's folder
        bench = work / f"benchmark_{name}"
        subprocess.run([sys.executable, "-m", "perceive.cli", "benchmark", "--model", str(model), "--split",
                        "validation", "--n", str(args.n), "--out", str(bench)], check=True)  # fmt: skip
        tables[name] = json.loads((bench / "benchmark.json").read_text())
    print(json.dumps({"recipe scale": args.scale, "scenes": args.scenes}, indent=1))
    for name, table in tables.items():
        print(name, json.dumps(table.get("metrics", table), indent=1)[:4000])


if __name__ == "__main__":
    main()
