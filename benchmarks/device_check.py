"""The checks to run when a GPU is at hand (no GPU was, when ``--device`` was written): the shipped models answering on
the device against the CPU, and a few training steps of each smoke recipe on the device.

    python benchmarks/device_check.py [--device cuda] [--scenes 3] [--out DIR]

First table: for each shipped model and a few world scenes, the same question asked on the CPU and on the device
(bf16 autocast on CUDA): how many answers have the same text, the largest box difference in pixels between objects
at the same place, and the seconds an answer takes on each. Second table: each smoke recipe trained whole on the device
(the UPN's phases too, for ChatRex; a few steps each) and saved, its last loss and steps per second. A failure is
printed in its row, not raised, so one run reports every check. For two or more GPUs, the sharded run to try next is
printed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch

import perceive
from perceive.devices import resolve_device
from perceive.world.generator import WorldConfig, generate_scene

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = {
    "tiny": "Please detect circle; person in this image. Answer the question with object indexes.",
    "mvp-tiny": "Please identify all objects according to the given phrase list. This is all the candidate phrases. "
    "circle, person, sky",
    "refvlm-tiny": "Provide a segmentation mask for the person in the picture.",
}


def answer_rows(device: str, scenes: int) -> list[str]:
    rows = []
    images = [generate_scene(seed, WorldConfig(size=256)).image for seed in range(scenes)]
    for name, question in QUESTIONS.items():
        try:
            answers, seconds = {}, {}
            for where in ("cpu", device):
                model = perceive.load(ROOT / "checkpoints" / name, device=where)
                model.ask(images[0], question)  # warm-up
                start = time.perf_counter()
                answers[where] = [model.ask(image, question) for image in images]
                seconds[where] = (time.perf_counter() - start) / len(images)
            same = sum(a.text == b.text for a, b in zip(answers["cpu"], answers[device], strict=True))
            shift = max((max(abs(p - q) for p, q in zip(a.box, b.box, strict=True))
                         for x, y in zip(answers["cpu"], answers[device], strict=True)
                         for a, b in zip(x.objects, y.objects, strict=False)), default=0.0)  # fmt: skip
            rows.append(f"| {name} | {same}/{scenes} | {shift:.1f} | {seconds['cpu']:.3f} | {seconds[device]:.3f} |")
        except Exception as e:  # a check that fails is a row of the report
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | |")
            traceback.print_exc()
    return rows


def training_rows(device: str, out: Path) -> list[str]:
    from perceive.train.mvp import MVP_RECIPES, train_mvp
    from perceive.train.refvlm import REFVLM_RECIPES, train_refvlm
    from perceive.train.trainer import train

    runs = {
        "smoke (ChatRex)": lambda o: train("smoke", o, progress=False, device=device),
        "mvp-smoke": lambda o: train_mvp(MVP_RECIPES["mvp-smoke"], o, progress=False, device=device),
        "refvlm-smoke": lambda o: train_refvlm(REFVLM_RECIPES["refvlm-smoke"], o, progress=False, device=device),
    }  # fmt: skip
    rows = []
    for name, run in runs.items():
        folder = out / name.split()[0]
        shutil.rmtree(folder, ignore_errors=True)
        try:
            start = time.perf_counter()
            run(folder)
            seconds = time.perf_counter() - start
            logged = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
            last = logged[-1] if logged else {}
            loss = float(last.get("loss", math.nan))
            finite = "yes" if math.isfinite(loss) else "NO"
            saved = "yes" if (folder / "model" / "config.json").is_file() else "NO"
            rows.append(f"| {name} | {last.get('phase', '-')} {last.get('step', 0)} | {loss:.4f} | {finite} | {saved} "
                        f"| {last.get('steps_per_s', 0):.2f} | {seconds:.0f} |")  # fmt: skip
        except Exception as e:
            rows.append(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | |")
            traceback.print_exc()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", help="the device to check against the CPU (cuda, cuda:N, mps, cpu)")
    ap.add_argument("--scenes", type=int, default=3, help="world scenes each model answers on")
    ap.add_argument("--out", default=None, help="where the training runs go (default: a temporary folder)")
    args = ap.parse_args()
    device = str(resolve_device(args.device))
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""))
    print("\n| model | same answer text | largest box shift (px) | s/answer, cpu | s/answer, device |")
    print("|---|---|---|---|---|")
    for row in answer_rows(device, args.scenes):
        print(row)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="device_check_"))
    print("\n| recipe | last logged step | loss | finite | saved | steps/s | seconds |\n|---|---|---|---|---|---|---|")
    for row in training_rows(device, out):
        print(row)
    if torch.cuda.device_count() > 1:
        print(f"\n{torch.cuda.device_count()} GPUs: next, torchrun --nproc_per_node {torch.cuda.device_count()} -m "
              f"perceive.cli train --config mvp-smoke --out {out / 'fsdp'} --device cuda --fsdp")  # fmt: skip


if __name__ == "__main__":
    main()
