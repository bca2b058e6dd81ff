"""How fast the tiny MLLM trains, asking one or several questions of each scene, and with each
attention implementation.

    python benchmarks/train_speed.py [--questions 1 2 4] [--attention eager sdpa] [--steps 8]
        [--upn checkpoints/tiny/upn]

Times the perception stage's training step of the tiny recipe at batch 16 (a fresh model; the
trained UPN's proposals, as in training) for each ``Recipe.questions_per_scene``: building the
batch (scenes, their language, proposals), then forward, backward and the optimizer step. Prints
seconds a step, steps and questions per second, and the ratio of steps per second to one question
a scene (the first one timed), measured in the same run. The precision is the recipe's (bf16 where the CPU has it).
A second table times the model's step at the recipe's questions a scene with each attention
implementation of the transformers models inside (by default eager, the tiny configuration's, then
sdpa, transformers' default), in the recipe's precision and in float32, on the same batches.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.models.upn.modeling_upn import UpnModel
from perceive.tokenization import build_world_tokenizer
from perceive.train.data import WorldTasks
from perceive.train.trainer import PERCEPTION_TASKS, RECIPES, autocast_dtype, build_model
from perceive.world.generator import WorldConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, nargs="+", default=[1, 2, 4], help="questions a scene to time")
    ap.add_argument("--attention", nargs="+", default=["eager", "sdpa"], help="attention implementations to time")
    ap.add_argument("--steps", type=int, default=8, help="timed steps each, after one warm-up step")
    ap.add_argument("--upn", default="checkpoints/tiny/upn")
    args = ap.parse_args()
    recipe = RECIPES["tiny"]
    with warnings.catch_warnings(record=True) as caught:
        dtype = autocast_dtype(recipe.precision)
    tokenizer = build_world_tokenizer()
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer, **recipe.model_options())
    processor = ChatRexProcessor(tokenizer, model.config)
    upn = UpnModel.from_pretrained(args.upn)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = recipe.batch_size

    rows = []
    built = {}  # questions a scene -> its batches, which the attention table reuses
    for k in args.questions:
        batches, t_batch = _perception_batches(processor, recipe, upn, k, args.steps)
        built[k] = batches
        rows.append((k, t_batch / args.steps, _model_seconds(model, optimizer, batches, dtype) / args.steps))

    precision = "bf16" if dtype is not None else "float32" + (" (no bf16 on this CPU)" if caught else "")
    print(f"tiny recipe, batch {b}, {args.steps} steps each, {precision}, {torch.get_num_threads()} threads\n")
    first = args.questions[0]
    print(f"| questions a scene | scenes a batch | batch s | model step s | steps/s | questions/s | vs {first} |")
    print("|---|---|---|---|---|---|---|")
    base = 1 / sum(rows[0][1:])
    for k, tb, tm in rows:
        rate = 1 / (tb + tm)
        print(f"| {k} | {b // k} | {tb:.3f} | {tm:.3f} | {rate:.2f} | {rate * b:.1f} | {rate / base:.2f}x |")

    batches = built.get(recipe.questions_per_scene)
    if batches is None:
        batches = _perception_batches(processor, recipe, upn, recipe.questions_per_scene, args.steps)[0]
    precisions = [("bf16", dtype), ("float32", None)] if dtype is not None else [("float32", None)]
    times = {}
    for name in args.attention:
        for label, autocast in precisions:
            torch.manual_seed(0)
            model = build_model(recipe.model, tokenizer, **recipe.model_options())
            for module in (model.vision.vit, model.language_model):  # the transformers models that attend
                module.set_attn_implementation(name)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            times[name, label] = _model_seconds(model, optimizer, batches, autocast) / args.steps
    print(f"\n{recipe.questions_per_scene} questions a scene, model step s (forward, backward, optimizer)\n")
    heads = [f"{label} s | {label} speed vs {args.attention[0]}" for label, _ in precisions]
    print("| attention | " + " | ".join(heads) + " |")
    print("|---|" + "---|---|" * len(precisions))
    for name in args.attention:
        cells = [f"{times[name, label]:.3f} | {times[args.attention[0], label] / times[name, label]:.2f}x"
                 for label, _ in precisions]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


def _perception_batches(processor, recipe, upn, questions_per_scene: int, steps: int) -> tuple[list, float]:
    """A warm-up batch and ``steps`` more of the perception stage, and the seconds the ``steps`` took to build."""
    data = WorldTasks(processor, WorldConfig(**recipe.world), seed=5, task_weights=PERCEPTION_TASKS, upn=upn,
                      questions_per_scene=questions_per_scene)  # fmt: skip
    b = recipe.batch_size
    batches = [data.batch(list(range(b)))[0]]  # the first batch and step warm caches and allocators
    t0 = time.perf_counter()
    batches += [data.batch(list(range(step * b, (step + 1) * b)))[0] for step in range(1, steps + 1)]
    return batches, time.perf_counter() - t0


def _model_seconds(model, optimizer, batches, dtype) -> float:
    """Seconds of forward, backward and optimizer step over ``batches[1:]`` (the first warms up)."""
    total = 0.0
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:
            total += time.perf_counter() - t0
    return total


if __name__ == "__main__":
    main()
