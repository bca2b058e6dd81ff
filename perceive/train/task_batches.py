"""The one-stage training of the decoder models (MVP-LM, REF-VLM): batches whose sample ``index`` is a record of a
stream and a task drawn by the recipe's weights, each a function of the step alone (a resumed run sees the same
batches), the learning rate (warmup, then cosine to a tenth), and the run itself (``train_one_stage``)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from perceive.data.records import ImageRecord
from perceive.devices import autocast, resolve_device, to_device
from perceive.models.pretrained_parts import PretrainedParts
from perceive.tokenization import add_tokens, load_tokenizer
from perceive.train.data import RecordStream
from perceive.train.sharding import save_model, whole_state


@dataclass
class OneStageRecipe:
    """A decoder model's recipe: one stage in which everything learns. A model's recipe sets its ``known_tasks`` and
    its defaults for ``model``, ``steps`` and ``tasks``."""

    known_tasks: ClassVar[tuple[str, ...]] = ()
    model: str = ""
    steps: int = 1500
    batch_size: int = 8
    lr: float = 8e-4
    warmup: int = 100
    tasks: dict[str, float] = field(default_factory=dict)
    world: dict = field(default_factory=lambda: {"size": 256, "person_share": 0.35, "relation_depth": 2})
    checkpoint_every: int = 100
    vocabulary_scenes: int = 300  # world scenes whose words the tokenizer is built over (training on the world)
    seed: int = 0
    # "bf16" (autocast; weights and optimizer stay float32) or "fp32"; a CPU without bf16 falls back to fp32
    precision: str = "bf16"
    overrides: dict = field(default_factory=dict)  # configuration fields changed from the named size

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(self.known_tasks))
        if unknown or not any(w > 0 for w in self.tasks.values()):
            raise ValueError(f"tasks must weigh some of {self.known_tasks}, got {self.tasks}")


ATTEMPTS = 20  # records tried from one sample index before the data is said to pose none of the tasks


class TaskBatches:
    """``item(index)``: a record of ``records`` and a task drawn by the weights in ``tasks`` (another task where the
    record cannot pose it); ``batch(indices)``: the model's inputs and targets. A model's batches say how to pose a
    task (``make_item``) and how to turn items into tensors (``make_batch``)."""

    needs = "the annotations its tasks need"  # said when no record poses any task

    def __init__(self, processor: Any, records: RecordStream, seed: int, tasks: dict[str, float]) -> None:
        self.processor = processor
        self.records = records
        self.seed = seed
        self.names = [t for t, w in tasks.items() if w > 0]
        self.weights = [tasks[t] for t in self.names]

    def make_item(self, record: ImageRecord, task: str, rng: random.Random) -> Any:
        raise NotImplementedError

    def make_batch(self, images: list[np.ndarray], items: list) -> dict:
        raise NotImplementedError

    def item(self, index: int) -> tuple[ImageRecord, Any]:
        for attempt in range(ATTEMPTS):
            record = self.records.record_for(self.seed, index + attempt * 7_919_993)
            rng = random.Random(self.seed * 1_000_003 + index * 31 + attempt)
            first = rng.choices(self.names, self.weights)[0]
            for task in [first, *[t for t in self.names if t != first]]:
                item = self.make_item(record, task, rng)
                if item is not None:
                    return record, item
        raise ValueError(f"{ATTEMPTS} records from sample {index} on pose none of the tasks {self.names}: does the "
                         f"data have {self.needs}?")  # fmt: skip

    def batch(self, indices: list[int]) -> dict:
        pairs = [self.item(i) for i in indices]
        return self.make_batch([r.image() for r, _ in pairs], [it for _, it in pairs])


def world_texts(world: Any, n_scenes: int = 300) -> list[str]:
    """The texts of ``n_scenes`` world records with masks and stuff (what a world tokenizer must spell)."""
    from perceive.train.data import WorldStream

    stream = WorldStream(world, masks=True)
    return [t for i in range(n_scenes) for t in stream.source.record(i).texts()]


def learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` down to a tenth of it at ``steps``."""
    warm = min(1.0, (step + 1) / warmup)
    done = max(0.0, (step - warmup) / max(1, steps - warmup))
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def train_one_stage(
    name: str, recipe: OneStageRecipe, out: Path, build_tokenizer: Callable[[list[str]], Any],
    added_tokens: Sequence[str], build: Callable[[Any, RecordStream], tuple[torch.nn.Module, TaskBatches]],
    progress: bool = True, stop_after: int | None = None, files: RecordStream | None = None,
    data: str | Path | None = None, parts: PretrainedParts | None = None, device: str = "cpu", fsdp: bool = False,
) -> Path:  # fmt: skip
    """A decoder model's one-stage recipe into ``out``, resuming whatever is there: the tokenizer built once over
    the world's texts (or the files'), or the language model's of ``parts``, ``build(tokenizer, records)`` gives the
    model and its batches, trained on ``device`` (sharded over torchrun's processes with ``fsdp``); the model and its
    tokenizer are saved in ``out/model`` at the end."""
    from perceive.train.checkpoint import atomic_folder
    from perceive.train.data import WorldStream
    from perceive.train.trainer import Distributed, _loop, autocast_dtype, data_vocabulary, loss_curve
    from perceive.world.generator import WorldConfig

    dtype = autocast_dtype(recipe.precision, resolve_device(device))
    ddp = Distributed(device, fsdp)
    world = WorldConfig(**recipe.world)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        made = {**asdict(recipe), "data": None if data is None else str(data),
                "parts": parts.to_json() if parts else None}  # fmt: skip
        (out / "recipe.json").write_text(json.dumps(made, indent=2))
    tok_dir = out / "tokenizer"
    if ddp.main and not (tok_dir / "tokenizer.json").is_file():
        with atomic_folder(tok_dir) as tmp:
            tokenizer = parts.tokenizer(added_tokens) if parts else None
            if tokenizer is None:
                texts = world_texts(world, recipe.vocabulary_scenes) if files is None else data_vocabulary(files)
                tokenizer = build_tokenizer(texts)
            tokenizer.save_pretrained(str(tmp))
    ddp.barrier()
    tokenizer = load_tokenizer(tok_dir)
    add_tokens(tokenizer, added_tokens)
    torch.manual_seed(recipe.seed)
    records: RecordStream = files if files is not None else WorldStream(world, masks=True)
    model, batches = build(tokenizer, records)
    ddp.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    b = recipe.batch_size

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, recipe.steps, recipe.warmup, recipe.lr)
        batch = to_device(batches.batch([step * b * ddp.world + ddp.rank * b + j for j in range(b)]), ddp.device)
        with autocast(ddp.device, dtype):
            result = model(**batch)
        assert result.loss is not None
        result.loss.backward()
        return {"loss": result.loss.detach(), **{k: v.detach() for k, v in result.losses.items()}}

    log = out / "train_log.jsonl"
    end = _loop(name, out, model, optimizer, recipe.steps, step_fn, recipe.checkpoint_every, ddp, progress, log,
                stop_after)  # fmt: skip
    state = whole_state(model) if end >= recipe.steps else None  # every process gathers a sharded model
    if end >= recipe.steps and ddp.main:
        with atomic_folder(out / "model") as tmp:
            save_model(model, tmp, state)
            tokenizer.save_pretrained(str(tmp))
        loss_curve(log, out / "loss_curve.png", phases=(name,))
    ddp.barrier()
    return out
