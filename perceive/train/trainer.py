"""Training: the UPN first, then the retrieval MLLM in ChatRex's three stages (Sec. 4.2).

1. alignment: only the projectors, the object encoder's heads and the language model's input and
   output embeddings learn, on region captions and brief grounded captions;
2. perception: everything learns, on detection, referring, counting and region captions;
3. joint: everything learns, on every task.

Every batch is a function of the step number alone (``perceive.train.data.TaskStream``), so a run that is killed and
resumed from its last checkpoint (or the one before, when the last does not read back whole) sees the
same data and reaches the same weights as one that was not. Under ``torchrun`` (or ``accelerate
launch``) each process takes its own share of each step's batch and gradients are averaged with the
gloo backend.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError
from torch.distributed.tensor import DTensor

from perceive.data.records import AttributeSchema, ImageRecord
from perceive.data.tasks import check_refer_options
from perceive.devices import autocast, resolve_device, to_device
from perceive.models.chatrex.configuration_chatrex import NAMED_CONFIGS, ChatRexConfig, named_config
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.models.image_processing import normalize_image, square_pixels
from perceive.models.pretrained_parts import PretrainedParts
from perceive.models.upn.configuration_upn import UpnConfig
from perceive.models.upn.modeling_upn import UpnModel
from perceive.tokenization import ASSISTANT, IMAGE, OBJ_TOKENS, ROI, build_world_tokenizer, load_tokenizer
from perceive.train.checkpoint import CheckpointError, atomic_folder, resume_checkpoint, save_checkpoint, set_aside
from perceive.train.data import (
    WORLD_ORDER_GROUPINGS,
    RecordStream,
    TaskStream,
    WorldStream,
    model_options,
    world_model_options,
)
from perceive.train.loader import BatchFeed
from perceive.train.sharding import is_sharded, save_model, shard, whole_state
from perceive.world.generator import WorldConfig, generate_scene

ALIGNMENT_TASKS = {"region_category": 2.0, "region_phrase": 1.0, "caption_brief": 1.0}
PERCEPTION_TASKS = {"detect": 2.0, "refer": 4.0, "count": 1.5, "region_category": 1.0, "region_phrase": 0.5}

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    name: str
    steps: int
    lr: float
    trainable: str  # "alignment" or "all"
    tasks: dict[str, float] | None = None  # None: every task with the default weights


@dataclass
class Recipe:
    model: str = "tiny"
    batch_size: int = 16
    upn_steps: int = 1200
    upn_batch_size: int = 16
    upn_lr: float = 2e-3
    # the UPN's box refinement (when its config has one), trained after the rest on the frozen first stage
    upn_refine_steps: int = 800
    upn_refine_lr: float = 1e-3
    stages: list[Stage] = field(default_factory=list)
    world: dict = field(default_factory=lambda: {"size": 256, "person_share": 0.35, "relation_depth": 2})
    upn_proposals: bool = True
    near_duplicates: bool = False  # also a second proposal of an object as a distractor (``TaskStream``)
    # how much likelier each kind of referring expression is drawn ("domain/sub_domain" -> weight, 1 where
    # absent; None: uniformly, ``perceive.data.tasks.refer``)
    refer_weights: dict[str, float] | None = None
    refer_expressions: int = 3  # at most this many expressions in one referring query
    # a batch of the MLLM asks this many questions of each scene, which it encodes once (``TaskStream``)
    questions_per_scene: int = 1
    # the attribute heads the model learns, of those the world labels (None: all of them, ``WORLD_ATTRIBUTES``)
    attributes: list[str] | None = None
    # the ways of being alike that a model with order_embedding counts ranks by
    order_groupings: list[list[str]] = field(default_factory=lambda: [list(g) for g in WORLD_ORDER_GROUPINGS])
    # how the true boxes and the proposals are mixed (``perceive.train.data``): "proposals_stand_in" or ChatRex's
    # "chatrex" (every true box kept, proposals with IoU > 0.9 to one dropped)
    box_mixing: str = "proposals_stand_in"
    # processes that make the MLLM's batches of a file dataset ahead of the step (0: in the training process; None:
    # none on 2 cores, where a worker slows the step more than waiting for data does: benchmarks/data_loader.py)
    loader_workers: int | None = None
    checkpoint_every: int = 100
    seed: int = 0
    # the MLLM's initialisation and data order when they should differ from the UPN's (None: ``seed``)
    mllm_seed: int | None = None
    warmup: int = 50
    # the MLLM's matmuls: "bf16" (autocast, weights and optimizer stay float32) or "fp32"; the UPN's box
    # regression always trains in float32. A CPU without bf16 instructions falls back to fp32.
    precision: str = "fp32"

    def __post_init__(self) -> None:  # a typo in the referring options fails now, not after the UPN's minutes
        check_refer_options(self.refer_weights, self.refer_expressions)
        if self.questions_per_scene < 1 or self.batch_size % self.questions_per_scene:
            raise ValueError(f"questions_per_scene must divide batch_size ({self.batch_size}), "
                             f"got {self.questions_per_scene}")  # fmt: skip
        world_model_options(self.attributes, self.order_groupings)  # names the world does not label fail now

    def model_options(self, schema: AttributeSchema | None = None) -> dict:
        """The configuration fields the training data decides (the world's, or a file dataset's ``schema``):
        the attribute heads and what reads them."""
        if schema is None:
            return world_model_options(self.attributes, self.order_groupings)
        return model_options(schema, self.attributes, self.order_groupings)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


RECIPES = {
    # sized to the 45-minute budget on 2 cores with bf16 (UPN 8 min, its refinement 4, the MLLM's 5,270 steps 26-29.5);
    # four questions a scene make a step 1.8x cheaper; MLLM seed 0 scored best of five on the validation scenes.
    # The measurements behind each number: docs/experiments/chatrex.md ("Round 22" and before)
    "tiny": Recipe(precision="bf16", mllm_seed=0, questions_per_scene=4, refer_weights={"reasoning/negation": 2.0},
                   stages=[Stage("alignment", 400, 1e-3, "alignment", ALIGNMENT_TASKS),
                           Stage("perception", 3550, 6e-4, "all", PERCEPTION_TASKS),
                           Stage("joint", 1320, 3e-4, "all")]),
    # a few steps of everything, for tests and for trying the pipeline
    "smoke": Recipe(batch_size=4, upn_steps=4, upn_batch_size=4, upn_refine_steps=4, checkpoint_every=2, warmup=1,
                    world={"size": 128, "person_share": 0.35, "max_objects": 5},
                    stages=[Stage("alignment", 2, 1e-3, "alignment", ALIGNMENT_TASKS),
                            Stage("perception", 2, 1e-3, "all", PERCEPTION_TASKS), Stage("joint", 2, 1e-3, "all")]),
    # ChatRex's real size (Sec. 4.2, B.2), meant for GPUs with the parts read from folders (--vision-tower, --convnext,
    # --language-model): 1e-3 while only the projectors and the new tokens learn, 2e-5 once everything does, 16
    # samples a GPU. The papers' settings, not measured here (no GPU); the steps are a starting point
    "chatrex-7b": Recipe(model="chatrex-7b", precision="bf16", batch_size=16, warmup=100, checkpoint_every=500,
                         stages=[Stage("alignment", 2000, 1e-3, "alignment", ALIGNMENT_TASKS),
                                 Stage("perception", 6000, 2e-5, "all", PERCEPTION_TASKS),
                                 Stage("joint", 4000, 2e-5, "all")]),
}  # fmt: skip


def build_model(
    config_name: str, tokenizer, parts: PretrainedParts | None = None, **overrides
) -> ChatRexForConditionalGeneration:
    """A new model of a named configuration with ``tokenizer``'s vocabulary and placeholder ids, its parts read from
    the folders of ``parts``; ``overrides`` carry what the training data decides (``Recipe.model_options``)."""
    ids = tokenizer.convert_tokens_to_ids
    if config_name not in NAMED_CONFIGS:
        raise ValueError(f"unknown config {config_name!r}; known: {', '.join(NAMED_CONFIGS)}")
    parts = parts or PretrainedParts()
    cfg = named_config(config_name, **parts.model_overrides(NAMED_CONFIGS[config_name], tokenizer),
                       image_token_id=ids(IMAGE), roi_token_id=ids(ROI), assistant_token_id=ids(ASSISTANT),
                       obj_token_ids=[ids(t) for t in OBJ_TOKENS], **overrides)  # fmt: skip
    model = ChatRexForConditionalGeneration(cfg)
    parts.load_into(model, tokenizer)
    return model


def cpu_has_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """The autocast dtype of a recipe's ``precision`` on ``device`` (this machine's CPU by default), None for float32
    and for hardware without bf16 (MPS's autocast is left alone)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    kind = "cpu" if device is None else device.type
    if precision == "fp32" or kind == "mps":
        return None
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if not cpu_has_bf16():  # emulated bf16 is slower than float32
        warnings.warn("this CPU has no bf16 matrix instructions: training in float32 (slower than the recipe's "
                      "measured timings)", stacklevel=2)  # fmt: skip
        return None
    return torch.bfloat16


def set_trainable(model: ChatRexForConditionalGeneration, mode: str) -> None:
    """ChatRex's stage 1 trains the projectors and the new tokens' embeddings; later stages everything."""
    for name, p in model.named_parameters():
        if mode == "all":
            p.requires_grad_(True)
        else:
            frozen = name.startswith(("vision.", "language_model.model.layers", "language_model.model.norm"))
            p.requires_grad_(not frozen)


def _lr(step: int, stage_start: int, stage: Stage, warmup: int) -> float:
    t = step - stage_start
    if t < warmup:
        return stage.lr * (t + 1) / warmup
    progress = (t - warmup) / max(1, stage.steps - warmup)
    return stage.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Distributed:
    """The processes of a run under ``torchrun``: each takes its share of a step's batch; gradients are averaged
    with gloo on the CPU and NCCL on CUDA, where each process takes the GPU of its ``LOCAL_RANK``."""

    def __init__(self, device: str | torch.device = "cpu", fsdp: bool = False) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.fsdp = fsdp  # the MLLM's parameters, gradients and optimizer state sharded (``perceive.train.sharding``)
        self.device = resolve_device(device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move ``model`` to the device and, with ``fsdp``, shard it; build its optimizer after this."""
        nn.Module.to(model, self.device)
        return shard(model, self.device) if self.fsdp else model

    def average_gradients(self, model: torch.nn.Module) -> None:
        if self.world == 1:
            return
        for p in model.parameters():
            if p.requires_grad and not isinstance(p, DTensor):  # FSDP averages its shards' gradients itself
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _loop(
    name: str,
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    total: int,
    step_fn: Callable[[int], dict[str, torch.Tensor]],
    every: int,
    ddp: Distributed,
    progress: bool,
    log: Path,
    stop_after: int | None = None,
) -> int:
    """Run steps ``[resume point, total)``; checkpoints every ``every`` steps. Returns the next step."""
    from tqdm import tqdm

    folder = out / "checkpoints" / name
    resumed = resume_checkpoint(folder, model, optimizer)
    start = resumed.state["step"]
    ddp.barrier()  # every process is done reading the broken checkpoints before they are moved
    if ddp.main:
        for path, problem in resumed.broken:
            try:
                kept = f"set aside as {set_aside(path).name}"
            except OSError as e:
                kept = f"left in place, could not be set aside: {e.strerror}"
            logger.warning(f"{problem}; that checkpoint is {kept}; resuming {name} from {resumed.path}")
        _trim_log(log, name, start)
        if resumed.path is not None and progress:
            print(f"resuming {name} from {resumed.path} (step {start})")
    bar = tqdm(total=total, initial=start, desc=name, unit="step", disable=not (progress and ddp.main))
    t0, done = time.perf_counter(), 0
    step = start
    while step < total:
        losses = step_fn(step)
        ddp.average_gradients(model)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        done += 1
        values = {k: round(float(v), 4) for k, v in losses.items()}
        rate = done / (time.perf_counter() - t0)
        if ddp.main:
            bar.set_postfix(loss=values.get("loss"), steps_s=f"{rate:.2f}")
            bar.update(1)
            with open(log, "a") as f:
                f.write(json.dumps({"phase": name, "step": step, **values, "steps_per_s": round(rate, 3)}) + "\n")
        if step % every == 0 or step == total:
            if ddp.main or is_sharded(model):  # every process of a sharded model gathers its shards
                save_checkpoint(folder, step, model, optimizer, {"phase": name}, write=ddp.main)
            ddp.barrier()
        if stop_after is not None and done >= stop_after:
            break
    bar.close()
    return step


def _upn_batch(
    seed: int, step: int, b: int, ddp: Distributed, world: WorldConfig, files: RecordStream | None = None
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A step's images for UPN training: normalised pixels, true boxes and granularities (1 for parts); the
    world's scenes, or the records of ``files`` at the UPN's input size."""
    indices = [step * b * ddp.world + ddp.rank * b + j for j in range(b)]
    if files is not None:
        return _upn_record_batch([files.record_for(seed, i) for i in indices], world.size)
    seeds = [seed * 10_000_019 + i for i in indices]
    scenes = [generate_scene(s, world) for s in seeds]
    x = normalize_image(torch.stack([torch.from_numpy(s.image.copy()).permute(2, 0, 1).float() / 255 for s in scenes]))
    boxes = [torch.tensor([o.box for o in s.objects]) for s in scenes]
    gran = [torch.tensor([1 if o.kind == "part" else 0 for o in s.objects]) for s in scenes]
    return x, boxes, gran


def _upn_record_batch(
    records: list[ImageRecord], size: int
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``_upn_batch`` of file records: each image padded to its square and resized to ``size``, its boxes with it;
    crowd regions are no proposals to learn."""
    images, boxes, gran = [], [], []
    for record in records:
        image = record.image()
        images.append(image)
        kept = [i for i in record.instances if not i.iscrowd]
        scale = size / max(image.shape[:2])
        boxes.append(torch.tensor([i.box for i in kept], dtype=torch.float32).reshape(-1, 4) * scale)
        gran.append(torch.tensor([1 if i.granularity == "part" else 0 for i in kept], dtype=torch.long))
    return square_pixels(images, size), boxes, gran


def _train_box_refinement(
    recipe: Recipe,
    out: Path,
    upn: UpnModel,
    world: WorldConfig,
    ddp: Distributed,
    progress: bool,
    log: Path,
    stop_after: int | None,
    files: RecordStream | None = None,
) -> bool:
    """Train the UPN's box refinement with the first stage frozen (it only reads its features and boxes);
    True when the phase has finished."""
    for name, p in upn.named_parameters():
        p.requires_grad = name.startswith("refine.")
    params = [p for p in upn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.upn_refine_lr, weight_decay=1e-4)
    total, b = recipe.upn_refine_steps, recipe.upn_batch_size
    torch.manual_seed(recipe.seed + 1)  # the distortions it learns from; a resume restores the RNG itself

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        for group in opt.param_groups:
            group["lr"] = recipe.upn_refine_lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / total))
        x, boxes, _ = to_device(_upn_batch(recipe.seed + 11, step, b, ddp, world, files), ddp.device)
        with torch.no_grad():
            res = upn(x)
        loss = upn.refinement_loss(res, x, boxes)
        loss.backward()
        return {"loss": loss.detach()}

    end = _loop("upn_refine", out, upn, opt, total, step_fn, recipe.checkpoint_every, ddp, progress, log, stop_after)
    for p in upn.parameters():
        p.requires_grad = True
    return end >= total


def train_upn(
    recipe: Recipe,
    out: Path,
    ddp: Distributed,
    progress: bool,
    log: Path,
    stop_after: int | None = None,
    files: RecordStream | None = None,
) -> UpnModel | None:
    """Train (or load the trained) UPN, on the world or on the records of ``files``; None if ``stop_after``
    ended the phase early."""
    if (out / "upn" / "model.safetensors").is_file():  # saved whole or not at all (``atomic_folder``)
        try:
            upn = UpnModel.from_pretrained(str(out / "upn"))
            nn.Module.to(upn, ddp.device)  # transformers' own ``to`` is typed for its model alone
            return upn
        except (OSError, ValueError, RuntimeError, SafetensorError) as e:
            raise CheckpointError(f"{out / 'upn'}: the trained UPN cannot be loaded ({str(e).splitlines()[0]}); "
                                  f"move it away to save it again from {out / 'checkpoints'}") from None  # fmt: skip
    cfg = UpnConfig(**cast(dict, NAMED_CONFIGS[recipe.model]["upn_config"]))
    world = WorldConfig(**{**recipe.world, "size": cfg.image_size})
    torch.manual_seed(recipe.seed)
    upn = UpnModel(cfg)
    nn.Module.to(upn, ddp.device)
    opt = torch.optim.AdamW(upn.parameters(), lr=recipe.upn_lr, weight_decay=1e-4)
    b = recipe.upn_batch_size

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        for group in opt.param_groups:
            group["lr"] = recipe.upn_lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * (1 - step / recipe.upn_steps))
        x, boxes, gran = to_device(_upn_batch(recipe.seed + 7, step, b, ddp, world, files), ddp.device)
        res = upn(x)
        losses = upn.loss(res, upn.targets(boxes, gran, res["scores"].shape[-1]))
        losses["loss"].backward()
        return {k: v.detach() for k, v in losses.items()}

    end = _loop("upn", out, upn, opt, recipe.upn_steps, step_fn, recipe.checkpoint_every, ddp, progress, log,
                stop_after)  # fmt: skip
    if end < recipe.upn_steps:
        return None
    if cfg.box_refinement and not _train_box_refinement(recipe, out, upn, world, ddp, progress, log, stop_after, files):
        return None
    if ddp.main:
        with atomic_folder(out / "upn") as tmp:
            upn.save_pretrained(str(tmp))
    ddp.barrier()
    return upn


def train(
    recipe: Recipe | str,
    out: str | Path,
    progress: bool = True,
    stop_after: int | None = None,
    data: str | Path | None = None,
    strict: bool = False,
    parts: PretrainedParts | None = None,
    device: str = "cpu",
    fsdp: bool = False,
) -> Path:
    """Train a model into ``out`` (resuming whatever is there), on the world or on the files of the data spec
    ``data`` (``perceive.data.spec``; ``strict``: stop at its first bad record), its vision tower, ConvNeXt or
    language model (and tokenizer) read from the folders of ``parts``. ``stop_after`` ends each phase (UPN,
    MLLM) of this call after that many steps (for tests and for splitting long runs); run it again to continue.
    ``device``: where it trains (``perceive.devices``; on CUDA under bf16 autocast); ``fsdp``: the MLLM sharded over
    torchrun's processes (``perceive.train.sharding``)."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    out = Path(out)
    dtype = autocast_dtype(recipe.precision, resolve_device(device))  # checked before the UPN's minutes, not after
    files = _file_data(data, strict, progress) if data is not None else None
    ddp = Distributed(device, fsdp)
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
        made = {**asdict(recipe), "data": None if data is None else str(data),
                "parts": parts.to_json() if parts else None}  # fmt: skip
        (out / "recipe.json").write_text(json.dumps(made, indent=2))
    ddp.barrier()
    log = out / "train_log.jsonl"
    tok_dir = out / "tokenizer"
    if ddp.main and not (tok_dir / "tokenizer.json").is_file():
        with atomic_folder(tok_dir) as tmp:
            pretrained = parts.tokenizer() if parts else None
            words = None if files is None or pretrained is not None else data_vocabulary(files)
            (pretrained or build_world_tokenizer(words)).save_pretrained(str(tmp))
    ddp.barrier()
    tokenizer = load_tokenizer(tok_dir)

    upn = train_upn(recipe, out, ddp, progress, log, stop_after, files)
    if upn is None:
        return out
    seed = recipe.seed if recipe.mllm_seed is None else recipe.mllm_seed
    torch.manual_seed(seed)
    model = build_model(recipe.model, tokenizer, parts, **recipe.model_options(None if files is None else files.schema))
    processor = ChatRexProcessor(tokenizer, cast(ChatRexConfig, model.config))
    proposals = None
    if files is not None and recipe.upn_proposals:
        proposals = _file_proposals(files, upn, out, ddp, progress)
    records: RecordStream = files if files is not None else WorldStream(WorldConfig(**recipe.world))
    ddp.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.stages[0].lr, weight_decay=0.01)
    starts = [sum(s.steps for s in recipe.stages[:i]) for i in range(len(recipe.stages))]
    world_upn = upn if recipe.upn_proposals and files is None else None  # files read their proposals computed once
    streams = [TaskStream(processor, records, seed=seed + 1 + i, task_weights=s.tasks, upn=world_upn,
                          proposals=proposals, near_duplicates=recipe.near_duplicates,
                          refer_weights=recipe.refer_weights, refer_expressions=recipe.refer_expressions,
                          questions_per_scene=recipe.questions_per_scene, box_mixing=recipe.box_mixing)
               for i, s in enumerate(recipe.stages)]  # fmt: skip
    b = recipe.batch_size

    def stage_of(step: int) -> int:
        return max(k for k, s in enumerate(starts) if s <= step)

    def make_batch(step: int) -> dict:
        indices = [step * b * ddp.world + ddp.rank * b + j for j in range(b)]
        return streams[stage_of(step)].batch(indices)[0]

    # a file dataset's batches are made ahead in worker processes; the world's need the UPN, so they are made here
    feed = BatchFeed(make_batch, recipe.total_steps, loader_workers(recipe) if files is not None else 0)
    current = {"trainable": ""}

    def step_fn(step: int) -> dict[str, torch.Tensor]:
        i = stage_of(step)
        stage = recipe.stages[i]
        if stage.trainable != current["trainable"]:  # freeze or unfreeze only when the stage changes
            set_trainable(model, stage.trainable)
            current["trainable"] = stage.trainable
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, starts[i], stage, recipe.warmup)
        batch = to_device(feed.get(step), ddp.device)
        with autocast(ddp.device, dtype):
            out_ = model(**batch)
        out_.loss.backward()
        return {"loss": out_.loss.detach(), **{k: v.detach() for k, v in out_.losses.items()}}

    end = _loop("mllm", out, model, optimizer, recipe.total_steps, step_fn, recipe.checkpoint_every, ddp, progress,
                log, stop_after)  # fmt: skip
    feed.close()
    state = whole_state(model) if end >= recipe.total_steps else None  # every process gathers a sharded model
    if end >= recipe.total_steps and ddp.main:
        with atomic_folder(out / "model") as tmp:
            save_model(model, tmp, state)
            tokenizer.save_pretrained(str(tmp))
            upn.save_pretrained(str(tmp / "upn"))
        loss_curve(log, out / "loss_curve.png")
    ddp.barrier()
    return out


def loader_workers(recipe: Recipe) -> int:
    """The recipe's loader workers, or by the cores: none on 2 (measured: a worker beside a 2-thread step made the
    step 1.38x slower and saved 0.017 s of its 0.34 of waiting), then one per two cores beyond two, up to four."""
    if recipe.loader_workers is not None:
        return recipe.loader_workers
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else max(1, min(4, (cores - 2) // 2))


def _file_data(data: str | Path, strict: bool, progress: bool):
    """The records of a data spec, as a stream, after printing what each source gives and skipped."""
    from perceive.data.spec import MixedRecords, load_spec

    spec = load_spec(data, strict=strict)
    if progress:
        print(spec.summary())
    return MixedRecords(spec)


def data_vocabulary(files) -> list[str]:
    """Every word the data's texts and the task templates use (the tiny configurations' word-level tokenizer),
    read from every record of every source once."""
    from perceive.tokenization import words_of

    texts: list[str] = []
    for source in files.spec.sources:
        for i in range(len(source)):
            texts += source.record(i).texts()
    return words_of(texts)


def _file_proposals(files, upn: UpnModel, out: Path, ddp: Distributed, progress: bool):
    """The UPN's proposals of every record, computed once (by the main process) and kept in ``out``."""
    from perceive.train import proposals

    def every_record():
        for k, source in enumerate(files.spec.sources):
            for i in range(len(source)):
                record = source.record(i)
                record.source = k
                yield record

    path = out / "proposals.safetensors"
    total = sum(len(source) for source in files.spec.sources)
    cache = proposals.build(upn, every_record(), path, total=total, progress=progress) if ddp.main else None
    ddp.barrier()
    return cache if cache is not None else proposals.build(upn, iter(()), path, progress=False)  # the main's file


def _log_row(line: str) -> dict | None:
    """A training log line's row, None for a line that is not one (the cut last line of a killed run)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(row, dict) and isinstance(row.get("phase"), str) and isinstance(row.get("step"), int)
    return row if ok else None


def read_log(log: Path) -> list[dict]:
    """The rows of a training log, one per phase and step (the last where a run before this code's resume
    logged a step twice), skipping lines that are not rows."""
    rows: dict[tuple[str, int], dict] = {}
    for line in log.read_text(errors="replace").splitlines():
        row = _log_row(line)
        if row is not None:
            rows.pop((row["phase"], row["step"]), None)  # the later row takes the earlier one's place
            rows[row["phase"], row["step"]] = row
    return list(rows.values())


def _trim_log(log: Path, phase: str, step: int) -> None:
    """Drop the log's rows of ``phase`` after ``step`` (the steps a resume from ``step`` runs and logs again)
    and any line that is not a row, so the log keeps one row per step and the next row starts a line."""
    if not log.is_file():
        return
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    rows = [_log_row(line) for line in lines]
    dropped = [r is None or (r["phase"] == phase and r["step"] > step) for r in rows]
    kept = [line for line, drop in zip(lines, dropped, strict=True) if not drop]
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return
    tmp = log.with_name(f".tmp_{log.name}")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, log)


def loss_curve(log: Path, path: Path, phases: tuple[str, ...] = ("upn", "mllm")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log)
    first_stage = max((r["step"] for r in rows if r["phase"] == "upn"), default=0)
    for r in rows:
        if r["phase"] == "upn_refine":  # the UPN's panel, after its first stage
            r.update(phase="upn", step=first_stage + r["step"], box_refinement=r.pop("loss"))
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        pts = sorted((r for r in rows if r["phase"] == phase), key=lambda r: r["step"])
        for key in sorted({k for r in pts for k in r} - {"phase", "step", "steps_per_s"}):
            xs = [r["step"] for r in pts if key in r]
            ys = [r[key] for r in pts if key in r]
            if len(xs) > 20:  # smooth for reading
                w = max(1, len(xs) // 50)
                ys = [sum(ys[max(0, i - w) : i + 1]) / len(ys[max(0, i - w) : i + 1]) for i in range(len(ys))]
            ax.plot(xs, ys, label=key)
        ax.set_title(f"{phase} losses")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        if pts:  # a run that reused a trained UPN logs no UPN steps
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
