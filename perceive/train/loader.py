"""Training batches made ahead in DataLoader worker processes, so a step does not wait for images to be
decoded, resized and tokenized.

Every batch is a function of its step (``make(step)``), so workers can make them in any process and a
resumed run starts its loader at the resumed step and sees the batches an unbroken run would. With
``workers=0`` batches are made in the training process, as they are for the world's stream (whose batches
need the UPN). ``waited`` counts the seconds the training process spent waiting for a batch: the
loader's share of a step (``benchmarks/data_loader.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class StepBatches(Dataset):
    """Batch ``step`` is ``make(step)``, for steps ``0 .. total - 1``."""

    def __init__(self, make: Callable[[int], dict], total: int) -> None:
        self.make, self.total = make, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, step: int) -> dict:
        return {**self.make(step), "step": torch.tensor(step)}


def _one_thread(_: int) -> None:
    # a worker making batches beside training should take a core, not every core
    torch.set_num_threads(1)


class BatchFeed:
    """``get(step)`` gives batch ``step``; called for consecutive steps, it reads them from workers that make
    the next ones meanwhile (``prefetch`` each)."""

    def __init__(self, make: Callable[[int], dict], total: int, workers: int = 0, prefetch: int = 2) -> None:
        self.dataset = StepBatches(make, total)
        self.workers, self.prefetch = workers, prefetch
        self.iterator: Iterator[dict] | None = None
        self.next_step = -1
        self.waited = 0.0

    def _start(self, step: int) -> Iterator[dict]:
        if self.workers == 0:
            return (self.dataset[s] for s in range(step, len(self.dataset)))
        loader = DataLoader(self.dataset, batch_size=None, sampler=range(step, len(self.dataset)),
                            num_workers=self.workers, prefetch_factor=self.prefetch, worker_init_fn=_one_thread,
                            multiprocessing_context="fork")  # fmt: skip
        return iter(loader)

    def get(self, step: int) -> dict:
        if self.iterator is None or step != self.next_step:
            self.iterator = self._start(step)
        t0 = time.perf_counter()
        batch = next(self.iterator)
        self.waited += time.perf_counter() - t0
        made = int(batch.pop("step"))
        if made != step:  # pragma: no cover - the sampler walks the steps in order
            raise RuntimeError(f"the loader made batch {made} for step {step}")
        self.next_step = step + 1
        return batch

    def close(self) -> None:
        self.iterator = None
