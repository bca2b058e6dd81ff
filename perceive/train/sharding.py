"""Sharded data parallelism (``perceive train --fsdp`` under ``torchrun``): PyTorch's FSDP (``fully_shard``) splits
each transformer layer's parameters, gradients and AdamW state across the processes, so a model whose training state
does not fit one GPU (``perceive info``: 109 GiB for a 7B) trains over several.

Checkpoints stay what an unsharded run writes, whole tensors in safetensors: every process gathers the shards when a
checkpoint is saved and one writes it; a resumed run, sharded or not, on any number of processes, takes each process's
part of the whole tensors again. The proposal network is small and stays replicated.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

# the modules that become FSDP units: every transformer layer of the parts (Qwen2's, CLIP's and SigLIP's) and of the
# decoders (MVP-LM's, REF-VLM's); the rest (embeddings, projectors, heads) belongs to the root unit
UNIT_SUFFIXES = ("DecoderLayer", "EncoderLayer")


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard ``model`` in place over every process (``fully_shard`` on each layer, then the root)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("--fsdp shards over the processes of torchrun: run it under torchrun --nproc_per_node N")
    # the trainers read the outputs' losses and never write into an output in place, which is what this warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # FSDP shards no scalar (MVP-LM's logit scale): it stays whole in every process, its gradient averaged by hand
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for module in list(model.modules())[1:]:
        if type(module).__name__.endswith(UNIT_SUFFIXES):
            fully_shard(module, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (every process must call this, in the same order), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(own: torch.Tensor, whole_tensor: torch.Tensor) -> torch.Tensor:
    """``whole_tensor`` as ``own`` is held: this process's shard where ``own`` is one (no communication: every process
    read the same whole tensor), else the tensor itself."""
    if isinstance(own, DTensor):
        return distribute_tensor(whole_tensor.to(own.device, own.dtype), own.device_mesh, own.placements,
                                 src_data_rank=None)  # fmt: skip
    return whole_tensor


def whole_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state on the CPU, a sharded model's gathered whole (every process must call this)."""
    return {k: whole(v).detach().cpu().contiguous() for k, v in model.state_dict().items()}


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state (``whole_tensors``), None for a model that is not one."""
    return whole_tensors(model) if is_sharded(model) else None


def save_model(model, folder: Path, state: dict[str, torch.Tensor] | None) -> None:
    """``model.save_pretrained(folder)``, of ``whole_state`` where the model is sharded."""
    if state is None:
        model.save_pretrained(str(folder))
        return
    model.save_pretrained(str(folder), state_dict=state)
    config = folder / "config.json"  # the class is FSDP's wrapper of the model's: name the model's own
    raw = json.loads(config.read_text())
    raw["architectures"] = [a.removeprefix("FSDP") for a in raw.get("architectures") or []]
    config.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
