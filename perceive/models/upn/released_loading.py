"""Reading the released UPN's weights (``upn_large.pth``, or the safetensors ``perceive convert`` wrote from it)
into ``ReleasedUpn``, every tensor accounted for.

The file's names are the released model's: the Swin under ``backbone.model.backbone``; the decoder's one box
MLP under twelve aliases (``bbox_embed.K`` and ``transformer.decoder.bbox_embed.K`` for each of the 6 layers),
which must hold equal tensors; each Swin block's ``relative_position_index``, a constant that must equal the one
computed here. Anything missing, unexpected or misshapen is one ``ModelFolderError`` listing it by name.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import torch

from perceive.models.folder_checks import weight_misfit
from perceive.models.pth import read_pth
from perceive.models.upn.released import ReleasedUpn, ReleasedUpnConfig, ReleasedUpnProposer
from perceive.models.upn.swin import WindowAttention, relative_position_index
from perceive.perceiver import ModelFolderError

SWIN = "backbone.model.backbone."
BOX_ALIAS = re.compile(r"^(?:transformer\.decoder\.)?bbox_embed\.(\d+)\.(.+)$")
RELATIVE_INDEX = "attn.relative_position_index"


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pth`` (read with ``weights_only``) or ``.safetensors`` file; a ``module.`` prefix on
    every name (how distributed training saves) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ModelFolderError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        weights = read_pth(path)
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module.") :]: v for k, v in weights.items()}
    return weights


def _count(weights: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in weights if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def config_from_weights(weights: dict[str, torch.Tensor], path: Path) -> ReleasedUpnConfig:
    """The sizes the tensors imply; the transformer's head count is the release's (8), which no shape shows."""
    attention = "transformer.encoder.layers.0.self_attn.attention_weights.weight"
    needed = [f"{SWIN}patch_embed.proj.weight", "transformer.level_embed", "transformer.tgt_embed.weight",
              "transformer.encoder.layers.0.linear1.weight", attention]  # fmt: skip
    absent = [k for k in needed if k not in weights]
    if absent:
        found = ", ".join(sorted({k.split(".")[0] for k in weights})[:12])
        raise ModelFolderError(f"{path} is not a UPN checkpoint in the released layout: it lacks {', '.join(absent)} "
                               f"(its names start with: {found or 'nothing'})")  # fmt: skip
    stages = _count(weights, re.escape(SWIN) + r"layers\.(\d+)\.")
    depths = tuple(_count(weights, re.escape(f"{SWIN}layers.{i}.") + r"blocks\.(\d+)\.") for i in range(stages))
    table_names = [f"{SWIN}layers.{i}.blocks.0.attn.relative_position_bias_table" for i in range(stages)]
    if not stages or any(name not in weights for name in table_names):
        raise ModelFolderError(f"{path}: the Swin's stages are incomplete (found {stages} stages, blocks {depths})")
    embed = weights[f"{SWIN}patch_embed.proj.weight"]
    levels, d_model = weights["transformer.level_embed"].shape
    base = ReleasedUpnConfig()
    return replace(
        base,
        swin_embed_dim=embed.shape[0],
        swin_patch=embed.shape[-1],
        swin_depths=depths,
        swin_heads=tuple(weights[name].shape[1] for name in table_names),
        swin_window=(math.isqrt(weights[table_names[0]].shape[0]) + 1) // 2,
        swin_mlp_ratio=weights[f"{SWIN}layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed.shape[0],
        d_model=d_model,
        levels=levels,
        points=weights[attention].shape[0] // (base.heads * levels),
        ffn=weights["transformer.encoder.layers.0.linear1.weight"].shape[0],
        encoder_layers=_count(weights, r"transformer\.encoder\.layers\.(\d+)\."),
        decoder_layers=_count(weights, r"transformer\.decoder\.layers\.(\d+)\."),
        num_queries=weights["transformer.tgt_embed.weight"].shape[0],
    )  # fmt: skip


def model_state(weights: dict[str, torch.Tensor], model: ReleasedUpn, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors under the names of ``model`` (built from the file's sizes), after checking the aliases
    and constants they share names with; a ``ModelFolderError`` for whatever does not fit."""
    config = model.config
    state, shown, problems = {}, {}, []
    aliases: dict[str, list[str]] = {}
    for name, tensor in weights.items():
        box = BOX_ALIAS.match(name)
        if name.startswith(SWIN) and name.endswith(RELATIVE_INDEX):
            window = config.swin_window
            if not torch.equal(tensor, relative_position_index(window)):
                problems.append(f"{name} is not the relative position index of a {window}x{window} window")
            continue
        if box and int(box.group(1)) < config.decoder_layers:
            aliases.setdefault(box.group(2), []).append(name)
            continue
        mine = "backbone." + name[len(SWIN) :] if name.startswith(SWIN) else name
        state[mine], shown[mine] = tensor, name
    for rest, names in aliases.items():
        first = weights[names[0]]
        if any(weights[n].shape != first.shape or not torch.equal(weights[n], first) for n in names[1:]):
            problems.append(f"the box MLP's aliases {', '.join(names[:3])}, ... differ; the release shares one")
        state[f"bbox_embed.{rest}"], shown[f"bbox_embed.{rest}"] = first, names[0]
    expected_aliases = {f"{prefix}bbox_embed.{k}.{rest}" for prefix in ("", "transformer.decoder.")
                        for k in range(config.decoder_layers) for rest in aliases}  # fmt: skip
    absent = sorted(expected_aliases - set(weights))
    absent += [f"{SWIN}layers.{i}.blocks.{j}.{RELATIVE_INDEX}" for i, depth in enumerate(config.swin_depths)
               for j in range(depth) if f"{SWIN}layers.{i}.blocks.{j}.{RELATIVE_INDEX}" not in weights]  # fmt: skip
    if absent:
        problems.append(f"{len(absent)} missing: {', '.join(absent[:4])}" + (", ..." if len(absent) > 4 else ""))
    misfit = weight_misfit(model, {k: list(v.shape) for k, v in state.items()}, shown, "the released layout")
    if misfit:
        problems.append(misfit)
    if problems:
        raise ModelFolderError(f"{path} does not fit the released UPN layout: {'; '.join(problems)}")
    return state


def load_released_upn(path: str | Path, device: torch.device | str = "cpu") -> ReleasedUpnProposer:
    """The released UPN of ``path`` (``.pth`` or ``.safetensors``), ready to ``propose`` boxes."""
    path = Path(path)
    weights = read_weights(path)
    with torch.device("meta"):
        model = ReleasedUpn(config_from_weights(weights, path))
    model.load_state_dict(model_state(weights, model, path), strict=True, assign=True)
    # the computed buffers were made on the meta device: made again, for real
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.relative_position_index = relative_position_index(module.window)
    return ReleasedUpnProposer(model.float(), device)
