"""``perceive info --config NAME``: a named configuration's parameters, built on the meta device, and the memory its
weights need to answer and to train at each precision."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from perceive.commands import CliError

# attribute heads come from the training data; a configuration alone is counted with COCO's 80 categories
EXAMPLE_ATTRIBUTE_HEADS = {"category": 80}

# bytes per parameter. Answering holds the weights alone. Training every parameter with AdamW holds, at float32,
# weights, gradients and two moments (4 + 4 + 8); under bf16 mixed precision, bf16 weights and gradients beside
# float32 master weights and moments (2 + 2 + 12: ZeRO's accounting, Rajbhandari et al. 2020). Activations, the
# KV cache and the framework's workspace come on top and depend on the batch.
BYTES_PER_PARAMETER = {"answer fp32": 4, "answer bf16": 2, "train fp32 (AdamW)": 16, "train bf16 mixed (AdamW)": 16}
SHARDS = 8  # FSDP's full sharding splits weights, gradients and optimizer states evenly over the GPUs


def memory_gib(parameters: int) -> dict[str, float]:
    """GiB each use of ``parameters`` needs for its weights (and, training, gradients and optimizer states)."""
    out = {k: parameters * b / 2**30 for k, b in BYTES_PER_PARAMETER.items()}
    out[f"train bf16 mixed, FSDP over {SHARDS} GPUs (per GPU)"] = out["train bf16 mixed (AdamW)"] / SHARDS
    return out


def print_memory(parameters: int, width: int) -> None:
    print("memory for the weights (activations, KV cache and workspace come on top):")
    for k, gib in memory_gib(parameters).items():
        print(f"  {k:{width}s} {gib:10.2f} GiB")


def cmd_info(args: argparse.Namespace) -> int:
    """Parameter counts of a named configuration (nothing is allocated)."""
    import torch

    from perceive.models.chatrex.configuration_chatrex import NAMED_CONFIGS, named_config
    from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
    from perceive.models.mvp.configuration_mvp import NAMED_CONFIGS as MVP_CONFIGS
    from perceive.models.refvlm.configuration_refvlm import NAMED_CONFIGS as REFVLM_CONFIGS
    from perceive.models.upn.modeling_upn import UpnModel

    if args.config in MVP_CONFIGS or args.config in REFVLM_CONFIGS:
        return _decoder_model_info(args)
    if args.config not in NAMED_CONFIGS:
        known = [*NAMED_CONFIGS, *MVP_CONFIGS, *REFVLM_CONFIGS]
        raise CliError(f"unknown config {args.config!r}; known: {', '.join(known)}")
    cfg = named_config(args.config, attribute_heads=EXAMPLE_ATTRIBUTE_HEADS)
    if not cfg.obj_token_ids:  # a real tokenizer's ids; only their count matters here
        vocab = cfg.text().vocab_size
        cfg.obj_token_ids = list(range(vocab - 100, vocab))
    with torch.device("meta"):
        model = ChatRexForConditionalGeneration(cfg)
        upn = UpnModel(cfg.upn())
    parts = {"vision (CLIP ViT)": model.vision.vit, "vision (ConvNeXt)": model.vision.convnext,
             "language model": model.language_model, "UPN": upn}  # fmt: skip
    projectors = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vision.", "language_model.")))
    rows = [(k, sum(p.numel() for p in m.parameters())) for k, m in parts.items()]
    rows.insert(3, ("projectors and object encoder", projectors))
    total = sum(n for _, n in rows)
    if args.json:
        json.dump({"config": args.config, **{k: n for k, n in rows}, "total": total, "memory_gib": memory_gib(total)},
                  sys.stdout)  # fmt: skip
        print()
        return 0
    print(
        f"config {args.config} ({cfg.model_type}): images {cfg.low_resolution}px (ViT) / {cfg.high_resolution}px "
        f"(ConvNeXt), layout {cfg.layout}, index head {cfg.index_head}; attribute heads counted as "
        f"{EXAMPLE_ATTRIBUTE_HEADS} (the training data decides them)"
    )
    for k, n in rows:
        print(f"  {k:32s} {n / 1e6:10.2f} M")
    print(f"  {'total':32s} {total / 1e6:10.2f} M")
    print_memory(total, 44)
    return 0


def _decoder_model_info(args: argparse.Namespace) -> int:
    """MVP-LM's and REF-VLM's configurations: the encoders, the LM, and the projector with the decoders."""
    import torch

    from perceive.models.mvp import configuration_mvp
    from perceive.models.mvp.modeling_mvp import MvpForConditionalGeneration
    from perceive.models.refvlm import configuration_refvlm
    from perceive.models.refvlm.modeling_refvlm import RefVlmForConditionalGeneration

    cfg: Any
    model: Any
    if args.config in configuration_mvp.NAMED_CONFIGS:
        cfg = configuration_mvp.named_config(args.config)
        shape = f"{cfg.thing_queries} thing and {cfg.stuff_queries} stuff queries, {cfg.decoder_layers} decoder layers"
        with torch.device("meta"):
            model = MvpForConditionalGeneration(cfg)
    else:
        cfg = configuration_refvlm.named_config(args.config)
        shape = f"box, mask and keypoint decoders of {cfg.decoder_layers} layers, {cfg.region_tokens} tokens a region"
        with torch.device("meta"):
            model = RefVlmForConditionalGeneration(cfg)
    parts = {"vision (CLIP ViT)": model.vision.vit, "vision (ConvNeXt)": model.vision.convnext,
             "language model": model.language_model}  # fmt: skip
    rows = [(k, sum(p.numel() for p in m.parameters())) for k, m in parts.items()]
    rows.append(("projector, pixel decoder and decoders",
                 sum(p.numel() for n, p in model.named_parameters()
                     if not n.startswith(("vision.", "language_model.")))))  # fmt: skip
    total = sum(n for _, n in rows)
    if args.json:
        json.dump({"config": args.config, **{k: n for k, n in rows}, "total": total, "memory_gib": memory_gib(total)},
                  sys.stdout)  # fmt: skip
        print()
        return 0
    print(f"config {args.config} ({cfg.model_type}): images {cfg.low_resolution}px (ViT) / {cfg.high_resolution}px "
          f"(ConvNeXt), {shape}")  # fmt: skip
    for k, n in rows:
        print(f"  {k:44s} {n / 1e6:10.2f} M")
    print(f"  {'total':44s} {total / 1e6:10.2f} M")
    print_memory(total, 44)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "info",
        help="parameter counts of a named configuration (built on the meta device) and the "
        "memory its weights need to answer and to train at each precision",
    )
    i.add_argument("--config", default="tiny")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
