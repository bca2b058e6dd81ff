"""Training REF-VLM from scratch (``perceive train --config refvlm-tiny``): one stage in which everything learns (the
paper's second stage; there is no pretrained LM to align a projector to first), on the world streamed with masks
or on a data spec's files, from REF-VLM's tasks (``perceive.data.tasks_refvlm``).

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

from perceive.data.records import ImageRecord
from perceive.data.tasks_refvlm import PLAN_TEXTS, REFVLM_TASKS, REGION, TEMPLATES, RefVlmItem, refvlm_item
from perceive.models.pretrained_parts import PretrainedParts
from perceive.models.refvlm.configuration_refvlm import NAMED_CONFIGS, RefVlmConfig, named_config
from perceive.models.refvlm.modeling_refvlm import RefVlmForConditionalGeneration
from perceive.models.refvlm.processing_refvlm import ONE_TOKEN_CHOICES, REFVLM_TOKENS, RefVlmProcessor
from perceive.tokenization import IMAGE, build_world_tokenizer, words_of
from perceive.train.data import RecordStream
from perceive.train.task_batches import OneStageRecipe, TaskBatches, train_one_stage

TASK_WEIGHTS = {"refer_box": 3.0, "refer_mask": 2.0, "interactive": 3.0, "region": 1.0, "detect": 1.5,
                "segment": 1.5, "keypoint": 1.5, "caption": 1.0}  # fmt: skip


@dataclass
class RefVlmRecipe(OneStageRecipe):
    known_tasks: ClassVar[tuple[str, ...]] = REFVLM_TASKS
    model: str = "refvlm-tiny"
    steps: int = 1500
    tasks: dict[str, float] = field(default_factory=lambda: dict(TASK_WEIGHTS))


REFVLM_RECIPES = {
    "refvlm-tiny": RefVlmRecipe(),
    # REF-VLM's stage 2 (Sec. IV) for GPUs with pretrained parts: everything learns at 2e-6, 16 samples a GPU. The
    # paper's settings, not measured here (no GPU); the steps are a starting point
    "refvlm-7b": RefVlmRecipe(model="refvlm-7b", steps=20000, batch_size=16, lr=2e-6, warmup=500, checkpoint_every=500),
    "refvlm-smoke": RefVlmRecipe(steps=4, batch_size=2, checkpoint_every=2, warmup=1, precision="fp32",
                                 vocabulary_scenes=20, world={"size": 128, "person_share": 0.5, "max_objects": 4},
                                 overrides={"high_resolution": 128, "prompt_resolution": 8, "decoder_layers": 1}),
}  # fmt: skip


class RefVlmBatches(TaskBatches):
    """The training batches: sample ``index`` is a record of ``records`` and a task drawn by the recipe's weights
    (another task where the record cannot pose it)."""

    needs = "boxes, masks or expressions"

    def make_item(self, record: ImageRecord, task: str, rng: random.Random) -> RefVlmItem | None:
        return refvlm_item(record, task, rng)

    def make_batch(self, images: list[np.ndarray], items: list) -> dict:
        return make_batch(self.processor, images, items)


def make_batch(processor: RefVlmProcessor, images: list[np.ndarray], items: list[RefVlmItem]) -> dict:
    """The model's inputs and targets for ``items`` on ``images``."""
    pixels, frames = processor.images(images)
    prompts = [processor.prompt(it.question, len(it.prompts)) for it in items]
    answers = [processor.answer(it) for it in items]
    batch: dict = {**pixels, **processor.collate(prompts, answers)}
    batch["prompt_masks"] = [processor.prompt_masks(it.prompts, f) for it, f in zip(items, frames, strict=True)]
    batch["targets"] = [processor.targets(it, a, f) for it, a, f in zip(items, answers, frames, strict=True)]
    return batch


def refvlm_tokenizer(texts: list[str]):
    """The word-level tokenizer over ``texts`` (or their words) and REF-VLM's templates, with TRP's tokens."""
    templates = [t.replace(REGION, " ") for t in TEMPLATES.values()]
    tok = build_world_tokenizer(words_of([*texts, *templates, *PLAN_TEXTS]))
    tok.add_tokens(list(REFVLM_TOKENS), special_tokens=True)
    return tok


def build_refvlm_model(
    config_name: str, tokenizer, parts: PretrainedParts | None = None, **overrides
) -> RefVlmForConditionalGeneration:
    """A new model of a named configuration with ``tokenizer``'s vocabulary and placeholder ids, its parts read from
    the folders of ``parts``."""
    if config_name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; known: {', '.join(NAMED_CONFIGS)}")
    parts = parts or PretrainedParts()
    ids = tokenizer.convert_tokens_to_ids
    cfg = named_config(config_name, **parts.model_overrides(NAMED_CONFIGS[config_name], tokenizer),
                       **{"image_token_id": ids(IMAGE), "region_token_id": ids(REGION), "ref_token_id": ids("<REF>"),
                          "eos_token_id": tokenizer.eos_token_id, **overrides})  # fmt: skip
    model = RefVlmForConditionalGeneration(cfg)
    parts.load_into(model, tokenizer)
    return model


def train_refvlm(
    recipe: RefVlmRecipe, out: Path, progress: bool = True, stop_after: int | None = None, files=None,
    data: str | Path | None = None, parts: PretrainedParts | None = None, device: str = "cpu",
    fsdp: bool = False,
) -> Path:  # fmt: skip
    """Train REF-VLM into ``out`` (resuming whatever is there) on the world or on ``files`` (a data spec's records),
    its parts read from the folders of ``parts``, on ``device`` (sharded over torchrun's processes with ``fsdp``)."""

    def build(tokenizer, records: RecordStream) -> tuple[torch.nn.Module, TaskBatches]:
        model = build_refvlm_model(recipe.model, tokenizer, parts, **recipe.overrides)
        processor = RefVlmProcessor(tokenizer, cast(RefVlmConfig, model.config))
        return model, RefVlmBatches(processor, records, recipe.seed + 1, recipe.tasks)

    added = [*REFVLM_TOKENS, *ONE_TOKEN_CHOICES]
    return train_one_stage("refvlm", recipe, out, refvlm_tokenizer, added, build, progress, stop_after, files, data,
                           parts, device, fsdp)  # fmt: skip
