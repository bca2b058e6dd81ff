"""``perceive train --config NAME --out DIR [--data SPEC] [--vision-tower DIR --convnext DIR --language-model DIR]``: a
model from scratch or from local pretrained parts, on the synthetic world or on a data spec's annotation files; the
same command resumes a killed run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from perceive.commands import CliError, add_device_option


def cmd_train(args: argparse.Namespace) -> int:
    from perceive.data.readers import FormatError
    from perceive.devices import resolve_device
    from perceive.perceiver import ModelFolderError
    from perceive.train.checkpoint import CheckpointError
    from perceive.train.mvp import MVP_RECIPES
    from perceive.train.refvlm import REFVLM_RECIPES
    from perceive.train.trainer import RECIPES, train

    parts = _pretrained_parts(args)
    try:  # a device this machine lacks fails now, not after the data is read
        resolve_device(args.device)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.fsdp and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise CliError("--fsdp shards the model over torchrun's processes: run torchrun --nproc_per_node N (N >= 2) "
                       "-m perceive.cli train ...")  # fmt: skip
    if args.config in MVP_RECIPES or args.config in REFVLM_RECIPES:
        return _train_decoder_model(args, parts)
    if args.config not in RECIPES:
        known = [*RECIPES, *MVP_RECIPES, *REFVLM_RECIPES]
        raise CliError(f"unknown config {args.config!r}; known: {', '.join(known)}")
    recipe = RECIPES[args.config]
    if args.loader_workers is not None:
        if args.loader_workers < 0:
            raise CliError(f"--loader-workers must be >= 0, got {args.loader_workers}")
        recipe = dataclasses.replace(recipe, loader_workers=args.loader_workers)
    try:
        out = train(recipe, args.out, progress=not args.quiet, stop_after=args.stop_after, data=args.data,
                    strict=args.strict, parts=parts, device=args.device, fsdp=args.fsdp)  # fmt: skip
    except (CheckpointError, ModelFolderError) as e:  # say which files, not a traceback
        raise CliError(str(e)) from None
    except (FormatError, FileNotFoundError) as e:  # a data spec or an annotation file that cannot be read
        raise CliError(str(e)) from None
    model = out / "model"
    if model.is_dir():
        print(f"trained model in {model} (loss curve: {out / 'loss_curve.png'})")
    else:
        print(f"stopped early; run the same command again to resume from {out / 'checkpoints'}")
    return 0


def _pretrained_parts(args: argparse.Namespace):
    """The folders of ``--vision-tower``, ``--convnext`` and ``--language-model``, each checked to hold a model."""
    from perceive.models.pretrained_parts import PretrainedParts

    try:
        return PretrainedParts(args.vision_tower, args.convnext, args.language_model)
    except FileNotFoundError as e:
        raise CliError(str(e)) from None


def _train_decoder_model(args: argparse.Namespace, parts) -> int:
    """MVP-LM's and REF-VLM's recipes: one stage over the world or a data spec's records."""
    from perceive.data.readers import FormatError
    from perceive.perceiver import ModelFolderError
    from perceive.train.checkpoint import CheckpointError
    from perceive.train.mvp import MVP_RECIPES, train_mvp
    from perceive.train.refvlm import REFVLM_RECIPES, train_refvlm
    from perceive.train.trainer import _file_data

    try:
        files = _file_data(args.data, args.strict, not args.quiet) if args.data is not None else None
        common = {"progress": not args.quiet, "stop_after": args.stop_after, "files": files, "data": args.data,
                  "parts": parts, "device": args.device, "fsdp": args.fsdp}  # fmt: skip
        if args.config in MVP_RECIPES:
            out = train_mvp(MVP_RECIPES[args.config], Path(args.out), **common)
        else:
            out = train_refvlm(REFVLM_RECIPES[args.config], Path(args.out), **common)
    except (CheckpointError, FormatError, FileNotFoundError, ModelFolderError) as e:
        raise CliError(str(e)) from None
    if (out / "model").is_dir():
        print(f"trained model in {out / 'model'} (loss curve: {out / 'loss_curve.png'})")
    else:
        print(f"stopped early; run the same command again to resume from {out / 'checkpoints'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", help="train a model from scratch on the world or on annotation files (resumes if killed)"
    )
    t.add_argument(
        "--config",
        default="tiny",
        help="training recipe: tiny (default), smoke, mvp-tiny, mvp-smoke, refvlm-tiny, refvlm-smoke; the papers' "
        "sizes for GPUs with --vision-tower, --convnext and --language-model: chatrex-7b, mvp-phi, refvlm-7b",
    )
    t.add_argument("--out", required=True, help="output folder (checkpoints, logs, the final model)")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop each phase after this many steps in this run (run again to resume)")  # fmt: skip
    t.add_argument("--data", default=None, metavar="SPEC",
                   help="annotation files to train on: a world export folder, or a JSON/YAML spec listing sources "
                        "(formats coco, lvis, panoptic, refcoco, humanref, jsonl, world) with weights; default: the "
                        "synthetic world, streamed")  # fmt: skip
    t.add_argument(
        "--strict", action="store_true", help="stop at the first bad record of --data instead of skipping it"
    )
    t.add_argument("--loader-workers", type=int, default=None, metavar="N",
                   help="processes making --data batches ahead of each step (default: none on 2 cores)")  # fmt: skip
    for flag, what in (
        ("--vision-tower", "a CLIP or SigLIP (whole, or its vision model)"),
        ("--convnext", "a ConvNeXt"),
        ("--language-model", "a Qwen2 / Qwen2.5 and its tokenizer"),
    ):
        t.add_argument(flag, type=Path, default=None, metavar="DIR",
                       help=f"start from {what}: a local transformers folder with safetensors weights; its "
                            f"configuration replaces the recipe's")  # fmt: skip
    add_device_option(t)
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model's parameters, gradients and optimizer state over the "
                        "processes (FSDP) instead of copying the model to each")  # fmt: skip
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)
