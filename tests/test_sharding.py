"""Sharded training (``perceive.train.sharding``): two processes shard a small transformer-shaped model with FSDP over
gloo; a checkpoint saved while sharded holds whole tensors (an unsharded model loads it strictly), and a sharded run
resumed from it reaches exactly the weights of the run that went on."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from perceive.train.checkpoint import load_checkpoint, save_checkpoint

WORLD = 2


class ToyDecoderLayer(nn.Module):  # named as the transformer layers FSDP makes its units of
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList([ToyDecoderLayer(), ToyDecoderLayer()])
        self.scale = nn.Parameter(torch.tensor(0.5))  # a scalar, which FSDP leaves whole
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x) * self.scale


def _train_steps(model, optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step * 10 + rank))
        model(x).pow(2).mean().backward()
        dist.all_reduce(model.scale.grad)  # the scalar FSDP leaves whole is averaged by hand, as the trainer does
        model.scale.grad /= WORLD
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _worker(rank: int, port: int, folder: str) -> None:
    from perceive.train.sharding import shard, whole

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    runs = []
    for resumed in (False, True):
        torch.manual_seed(0)
        model = shard(Toy(), torch.device("cpu"))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        if resumed:
            load_checkpoint(Path(folder) / "step_0000002", model, optimizer)
        else:
            _train_steps(model, optimizer, rank, range(2))
            save_checkpoint(Path(folder), 2, model, optimizer, {"phase": "toy"}, write=rank == 0)
            dist.barrier()
        _train_steps(model, optimizer, rank, range(2, 4))
        runs.append({k: whole(v).detach().clone() for k, v in model.state_dict().items()})
    if rank == 0:
        torch.save({"went_on": runs[0], "resumed": runs[1]}, Path(folder) / "weights.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_a_sharded_checkpoint_is_whole_and_resumes_exactly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    went_on, resumed = weights["went_on"], weights["resumed"]
    assert went_on.keys() == resumed.keys() and all(torch.equal(went_on[k], resumed[k]) for k in went_on)

    # the checkpoint is an unsharded model's: whole tensors under the model's own names, its AdamW state included
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    assert load_checkpoint(tmp_path / "step_0000002", model, optimizer)["phase"] == "toy"
    assert model.layers[1].fc.weight.shape == (8, 8) and len(optimizer.state) == len(list(model.parameters()))
