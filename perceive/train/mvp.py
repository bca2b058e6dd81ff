"""Training MVP-LM from scratch (``perceive train --config mvp-tiny``): one stage in which everything learns, on the
world streamed with masks or on a data spec's files, from MVP-LM's four tasks (``perceive.data.tasks_mvp``).

Every batch is a function of the step number alone, so a run killed and resumed from its last checkpoint reaches
the same weights (``perceive.train.trainer``'s loop and checkpoints).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, cast

import numpy as np
import torch

from perceive.boxes import convert
from perceive.data.records import ImageRecord
from perceive.data.tasks_mvp import MVP_TASKS, MvpItem, mvp_item
from perceive.formats.mvp import PER, RESULT_LEAD, SENTENCE_TASK, WORD_TASK
from perceive.models.image_processing import ImageFrame
from perceive.models.mvp.configuration_mvp import NAMED_CONFIGS, MvpConfig, named_config
from perceive.models.mvp.modeling_mvp import MvpForConditionalGeneration
from perceive.models.mvp.processing_mvp import MvpProcessor, target_masks
from perceive.models.pretrained_parts import PretrainedParts
from perceive.tokenization import IMAGE, build_world_tokenizer, words_of
from perceive.train.data import RecordStream
from perceive.train.task_batches import OneStageRecipe, TaskBatches, train_one_stage

TASK_WEIGHTS = {"panoptic": 3.0, "detect": 2.0, "ground": 1.0, "refer": 4.0}
TEMPLATE_TEXTS = (WORD_TASK, SENTENCE_TASK, f". {RESULT_LEAD}", ", ")


@dataclass
class MvpRecipe(OneStageRecipe):
    known_tasks: ClassVar[tuple[str, ...]] = MVP_TASKS
    model: str = "mvp-tiny"
    steps: int = 1600
    tasks: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))


MVP_RECIPES = {
    "mvp-tiny": MvpRecipe(),
    # MVP-LM's stage 2 (mvp-lm.txt, the training table) for GPUs with pretrained parts: everything learns, 64 samples a
    # step over 8 GPUs, 3% warmup then cosine. The table leaves the learning rate blank: 2e-5, not measured here
    "mvp-phi": MvpRecipe(model="mvp-phi", steps=20000, batch_size=8, lr=2e-5, warmup=600, checkpoint_every=500),
    "mvp-smoke": MvpRecipe(steps=4, batch_size=2, checkpoint_every=2, warmup=1, precision="fp32", vocabulary_scenes=20,
                           world={"size": 128, "person_share": 0.35, "max_objects": 4},
                           overrides={"high_resolution": 128, "decoder_layers": 2, "thing_queries": 8,
                                      "stuff_queries": 4}),
}  # fmt: skip


class MvpBatches(TaskBatches):
    """The training batches: sample ``index`` is a record of ``records`` and a task drawn by the recipe's weights
    (another task where the record cannot pose it)."""

    needs = "masks, expressions or grounded captions"

    def make_item(self, record: ImageRecord, task: str, rng: random.Random) -> MvpItem | None:
        return mvp_item(record, task, rng)

    def make_batch(self, images: list[np.ndarray], items: list) -> dict:
        return make_batch(self.processor, images, items)


def make_batch(processor: MvpProcessor, images: list[np.ndarray], items: list[MvpItem]) -> dict:
    """The model's inputs and targets for ``items`` on ``images``."""
    pixels, frames = processor.images(images)
    examples = [processor.example(it.instruction, it.caption) for it in items]
    batch: dict = {**pixels, **processor.collate(examples, [it.instruction for it in items])}
    batch["targets"] = [item_targets(it, f, processor.mask_size) for it, f in zip(items, frames, strict=True)]
    return batch


def item_targets(item: MvpItem, frame: ImageFrame, mask_size: int) -> dict[str, torch.Tensor]:
    boxes = torch.tensor(frame.normalize(np.array([t.box for t in item.targets]).reshape(-1, 4)))
    return {"labels": torch.tensor([t.label for t in item.targets], dtype=torch.long),
            "boxes": convert(boxes.clamp(0, 1), "xyxy", "cxcywh"),
            "masks": target_masks([t.mask for t in item.targets], frame, mask_size),
            "stuff": torch.tensor([t.stuff for t in item.targets], dtype=torch.bool),
            "has_mask": torch.tensor([t.has_mask for t in item.targets], dtype=torch.bool)}  # fmt: skip


def mvp_tokenizer(texts: list[str]):
    """The word-level tokenizer over ``texts`` (or their words) and MVP-LM's templates, with ``<PER>``."""
    tok = build_world_tokenizer(words_of([*texts, *TEMPLATE_TEXTS]))
    tok.add_tokens([PER], special_tokens=True)
    return tok


def build_mvp_model(
    config_name: str, tokenizer, parts: PretrainedParts | None = None, **overrides
) -> MvpForConditionalGeneration:
    """A new model of a named configuration with ``tokenizer``'s vocabulary and placeholder ids, its parts read from
    the folders of ``parts``."""
    if config_name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; known: {', '.join(NAMED_CONFIGS)}")
    parts = parts or PretrainedParts()
    ids = tokenizer.convert_tokens_to_ids
    cfg = named_config(config_name, **parts.model_overrides(NAMED_CONFIGS[config_name], tokenizer),
                       **{"image_token_id": ids(IMAGE), "per_token_id": ids(PER), **overrides})  # fmt: skip
    model = MvpForConditionalGeneration(cfg)
    parts.load_into(model, tokenizer)
    return model


def train_mvp(
    recipe: MvpRecipe, out: Path, progress: bool = True, stop_after: int | None = None, files=None,
    data: str | Path | None = None, parts: PretrainedParts | None = None, device: str = "cpu",
    fsdp: bool = False,
) -> Path:  # fmt: skip
    """Train MVP-LM into ``out`` (resuming whatever is there) on the world or on ``files`` (a data spec's records),
    its parts read from the folders of ``parts``, on ``device`` (sharded over torchrun's processes with ``fsdp``)."""

    def build(tokenizer, records: RecordStream) -> tuple[torch.nn.Module, TaskBatches]:
        model = build_mvp_model(recipe.model, tokenizer, parts, **recipe.overrides)
        processor = MvpProcessor(tokenizer, cast(MvpConfig, model.config))
        return model, MvpBatches(processor, records, recipe.seed + 1, recipe.tasks)

    return train_one_stage("mvp", recipe, out, mvp_tokenizer, [PER], build, progress, stop_after, files, data, parts,
                           device, fsdp)  # fmt: skip
