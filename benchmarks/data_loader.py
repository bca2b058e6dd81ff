"""How much of a training step waits for data, when the MLLM trains from annotation files.

    python benchmarks/data_loader.py --data out/world20k [--steps 30] [--workers 0 1 2]

Times the tiny recipe's perception-stage step (batch 16, four questions an image, the recipe's precision)
on the records of a data spec, its batches made by ``perceive.train.loader.BatchFeed`` with each number of
worker processes: the seconds a step takes, the seconds the training process waited for its batch, and
that wait's share of the step. With 0 workers every batch is made in the training process (decoding the
images, resizing them, posing the questions, tokenizing): the whole making is the wait. Proposals come
from the records' true boxes only here (training reads them from a file computed once, a lookup).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from perceive.data.spec import MixedRecords, load_spec
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.perceiver import DEFAULT_MODEL
from perceive.tokenization import load_tokenizer
from perceive.train.data import TaskStream
from perceive.train.loader import BatchFeed
from perceive.train.trainer import PERCEPTION_TASKS, RECIPES, autocast_dtype, build_model


def measure(data: MixedRecords, workers: int, steps: int) -> tuple[float, float]:
    """(seconds a step, seconds waited for its batch), over ``steps`` steps after two to warm up."""
    recipe = RECIPES["tiny"]
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = build_model(recipe.model, tokenizer, **recipe.model_options(data.schema))
    stream = TaskStream(ChatRexProcessor(tokenizer, model.config), data, seed=5, task_weights=PERCEPTION_TASKS,
                        questions_per_scene=recipe.questions_per_scene)  # fmt: skip
    b = recipe.batch_size
    feed = BatchFeed(lambda step: stream.batch(list(range(step * b, (step + 1) * b)))[0], steps + 2, workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = autocast_dtype(recipe.precision)
    t0 = waited0 = 0.0
    for step in range(steps + 2):
        if step == 2:  # the first batches start the workers and warm the allocators
            t0, waited0 = time.perf_counter(), feed.waited
        batch = feed.get(step)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    feed.close()
    return (time.perf_counter() - t0) / steps, (feed.waited - waited0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a data spec (a world export folder, or a JSON/YAML spec)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message=".*bf16.*")
    data = MixedRecords(load_spec(args.data))
    print(f"{args.steps} perception steps of the tiny recipe at batch 16 on {args.data}, {torch.get_num_threads()} "
          f"threads\n")  # fmt: skip
    print("| loader workers | s / step | waiting for data, s / step | its share of the step |")
    print("|---|---|---|---|")
    for workers in args.workers:
        step, waited = measure(data, workers, args.steps)
        print(f"| {workers} | {step:.3f} | {waited:.3f} | {100 * waited / step:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
