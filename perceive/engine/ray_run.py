"""The engine on Ray Data: each stage a ``map_batches`` over a pool of actors, each actor loading the stage's
model once (on its first batch) and keeping it. Items travel as JSON strings; finished items stream back to the
driver, which appends them to ``results.jsonl`` as they come, so a killed run resumes as a local one does.

Ray is an optional extra (``pip install 'perceive[engine]'``); running locally needs none of it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

from perceive.engine.stages import Stage, run_stage

_MISSING = "--ray needs Ray installed: pip install 'perceive[engine]' (or run without --ray)"


class StageWorker:
    """One Ray actor of a stage: the stage (its model loaded on first use) over batches of JSON items."""

    def __init__(self, stage: Stage, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the actors share the machine's cores: no one of them takes them all
        self.stage = stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [json.loads(s) for s in batch["item"]]
        run_stage(self.stage, items)
        return {"item": np.array([json.dumps(it) for it in items], dtype=object)}


def run_on_ray(
    stages: list[Stage],
    pending: list[dict],
    batch_size: int,
    on_done: Callable[[list[dict]], None],
    address: str = "auto",
    workers: int = 1,
) -> None:
    """``stages`` over ``pending`` on Ray: "auto" starts a local cluster (stopped at the end), another address
    joins that cluster. ``workers`` actors per stage."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError(_MISSING) from e
    if not pending:
        return
    started = not ray.is_initialized()
    if started:
        ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the engine's own bar counts images
        cpus = float(ray.cluster_resources().get("CPU", 1))
        # every stage's actors fit at once: a pipeline whose last stage cannot be placed never finishes
        share = min(1.0, cpus / (len(stages) * workers))
        ds: ray.data.Dataset = ray.data.from_items([{"item": json.dumps(it)} for it in pending])
        for stage in stages:
            ds = ds.map_batches(StageWorker, fn_constructor_args=(stage, max(1, int(share))), batch_size=batch_size,
                                concurrency=workers, num_cpus=share, batch_format="numpy")  # fmt: skip
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            on_done([json.loads(s) for s in batch["item"]])
    finally:
        if started:
            ray.shutdown()
