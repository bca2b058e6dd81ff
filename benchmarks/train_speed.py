"""How fast the tiny MLLM trains, asking one or several questions of each scene.

    python benchmarks/train_speed.py [--questions 1 2 4] [--steps 8] [--upn checkpoints/tiny/upn]

Times the perception stage's training step of the tiny recipe at batch 16 (a fresh model; the
trained UPN's proposals, as in training) for each ``Recipe.questions_per_scene``: building the
batch (scenes, their language, proposals), then forward, backward and the optimizer step. Prints
seconds a step, steps and questions per second, and the ratio of steps per second to one question
a scene (the first one timed), measured in the same run. The precision is the recipe's (bf16 where the CPU has it).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from perceive.models.modeling_upn import UpnModel
from perceive.processing import PerceiverProcessor
from perceive.tokenization import build_world_tokenizer
from perceive.train.data import WorldTasks
from perceive.train.trainer import PERCEPTION_TASKS, RECIPES, autocast_dtype, build_model
from perceive.world.generator import WorldConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, nargs="+", default=[1, 2, 4], help="questions a scene to time")
    ap.add_argument("--steps", type=int, default=8, help="timed steps each, after one warm-up step")
    ap.add_argument("--upn", default="checkpoints/tiny/upn")
    args = ap.parse_args()
    recipe = RECIPES["tiny"]
    with warnings.catch_warnings(record=True) as caught:
        dtype = autocast_dtype(recipe.precision)
    tokenizer = build_world_tokenizer()
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer)
    processor = PerceiverProcessor(tokenizer, model.config)
    upn = UpnModel.from_pretrained(args.upn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = recipe.batch_size

    rows = []
    for k in args.questions:
        data = WorldTasks(processor, WorldConfig(**recipe.world), seed=5, task_weights=PERCEPTION_TASKS, upn=upn,
                          questions_per_scene=k)  # fmt: skip
        t_batch = t_model = 0.0
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            batch, _ = data.batch(list(range(step * b, (step + 1) * b)))
            t1 = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step warms caches and allocators
                t_batch += t1 - t0
                t_model += time.perf_counter() - t1
        rows.append((k, t_batch / args.steps, t_model / args.steps))

    precision = "bf16" if dtype is not None else "float32" + (" (no bf16 on this CPU)" if caught else "")
    print(f"tiny recipe, batch {b}, {args.steps} steps each, {precision}, {torch.get_num_threads()} threads\n")
    first = args.questions[0]
    print(f"| questions a scene | scenes a batch | batch s | model step s | steps/s | questions/s | vs {first} |")
    print("|---|---|---|---|---|---|---|")
    base = 1 / sum(rows[0][1:])
    for k, tb, tm in rows:
        rate = 1 / (tb + tm)
        print(f"| {k} | {b // k} | {tb:.3f} | {tm:.3f} | {rate:.2f} | {rate * b:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
