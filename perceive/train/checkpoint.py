"""Training checkpoints as safetensors (never pickle): model weights, optimizer state, RNG states and
a JSON trainer state with each file's size and SHA-256. Written to a temporary folder, flushed to disk
and renamed, so a kill or a power cut mid-write leaves the last complete checkpoint intact. A restart
resumes from the newest checkpoint that reads back whole and fits the model (``resume_checkpoint``);
a broken one is named, set aside and the one before it used."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from perceive.train.sharding import like, whole, whole_tensors

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
BROKEN_PREFIX = "broken_"  # a checkpoint that failed to load, kept under this name for the user to inspect


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and what is wrong, in one line."""


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state into named tensors plus JSON-able hyper-parameters; a sharded state is gathered
    whole (``perceive.train.sharding``)."""
    sd = optimizer.state_dict()
    tensors = {}
    for pid in sorted(sd["state"]):  # in one order in every process: a sharded state is gathered tensor by tensor
        for name, value in sorted(sd["state"][pid].items()):
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{pid}.{name}"] = whole(t).detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        param = params[int(pid)] if int(pid) < len(params) else None
        state.setdefault(int(pid), {})[name] = like(param, t) if param is not None and t.dim() else t
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():  # a platform that cannot open folders (Windows) keeps renames in order itself
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush everything under ``root`` to disk, so a rename after it never exposes data still in the page cache."""
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final`` to write into; when the block ends, flush it to disk and
    rename it to ``final`` (replacing an old one). A kill leaves the old folder or the new one, never a
    half-written ``final``; an exception in the block removes the temporary folder."""
    tmp = final.with_name(f".tmp_{final.name}")
    old = final.with_name(f".old_{final.name}")
    for stale in (tmp, old):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # a folder cannot be renamed over a non-empty one: move the old one out of the way
            final.rename(old)
        tmp.rename(final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state as safetensors can write it, a sharded one gathered whole: a tensor tied to one already
    listed (a language model's tied input and output embeddings) is written again as a copy, so the checkpoint loads
    back strictly."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in whole_tensors(model).items():
        out[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


def save_checkpoint(
    folder: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    keep: int = 2,
    write: bool = True,
) -> Path:
    """Save ``step``'s checkpoint into ``folder`` atomically and delete all but the newest ``keep``. A sharded model's
    processes all call this (they gather its shards); only those told to ``write`` do."""
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    weights = model_tensors(model)
    if not write:
        return folder / f"step_{step:07d}"
    files = {
        MODEL_FILE: save(weights),
        OPTIMIZER_FILE: save(opt_tensors),
        RNG_FILE: save({"torch": torch.get_rng_state()}),
    }
    saved = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    state = {**trainer_state, "step": step, "optimizer": opt_meta, "files": saved}
    with atomic_folder(folder / f"step_{step:07d}") as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / STATE_FILE).write_text(json.dumps(state))
    for old in checkpoints(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / f"step_{step:07d}"


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in ``folder``, newest first (whether complete or not)."""
    return sorted((p for p in folder.glob("step_*") if p.is_dir()), reverse=True)


@dataclass
class _Checkpoint:
    """A checkpoint read and checked against the model and optimizer, not yet applied to them."""

    state: dict
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: torch.Tensor


def _shape(t: torch.Tensor | torch.Size) -> list[int]:
    return list(t.shape if isinstance(t, torch.Tensor) else t)


def _read_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON or not UTF-8
        raise CheckpointError(f"{file}: not readable JSON ({e})") from None
    expected_step = int(path.name.removeprefix("step_")) if path.name.removeprefix("step_").isdigit() else None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] != expected_step:
        raise CheckpointError(f"{file}: no 'step' matching its folder's name")
    if not isinstance(state.get("optimizer"), dict) or not isinstance(state["optimizer"].get("param_groups"), list):
        raise CheckpointError(f"{file}: no 'optimizer' with its 'param_groups'")
    files = state.get("files", {})  # checkpoints saved before checksums have none
    if not isinstance(files, dict) or not all(isinstance(f, dict) for f in files.values()):
        raise CheckpointError(f"{file}: 'files' is not an object of objects")
    return state


def _read_tensors(path: Path, name: str, state: dict) -> dict[str, torch.Tensor]:
    file = path / name
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except OSError as e:
        raise CheckpointError(f"{file}: not readable ({e.strerror})") from None
    saved = state.get("files", {}).get(name, {})
    if saved.get("bytes", len(data)) != len(data):
        raise CheckpointError(f"{file}: {len(data)} bytes where {saved['bytes']} were saved (truncated or overwritten)")
    if saved.get("sha256", None) not in (None, hashlib.sha256(data).hexdigest()):
        raise CheckpointError(f"{file}: corrupt (its SHA-256 differs from the one saved with it)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _check_weights(file: Path, weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{file}: does not fit the model: missing {missing[:3]} ({len(missing)}), "
                              f"unexpected {unexpected[:3]} ({len(unexpected)})")  # fmt: skip
    for key, t in sorted(weights.items()):  # the same first mismatch every time
        if t.shape != own[key].shape:
            raise CheckpointError(f"{file}: does not fit the model: {key} has shape {_shape(t)}, "
                                  f"the model's {_shape(own[key])}")  # fmt: skip


def _check_optimizer(
    file: Path, tensors: dict[str, torch.Tensor], groups: list, optimizer: torch.optim.Optimizer
) -> None:
    own = optimizer.param_groups
    if len(groups) != len(own) or any(
        not isinstance(g, dict) or not isinstance(g.get("params"), list) or len(g["params"]) != len(o["params"])
        for g, o in zip(groups, own, strict=False)
    ):
        sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else "?" for g in groups]
        raise CheckpointError(f"{file}: its parameter groups (sizes {sizes}) do not fit the optimizer's "
                              f"({[len(o['params']) for o in own]})")  # fmt: skip
    # the saved ids map onto the optimizer's parameters in order, as torch.optim.Optimizer.load_state_dict does
    params = dict(zip((i for g in groups for i in g["params"]), (p for o in own for p in o["params"]), strict=True))
    for key, t in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or int(parts[1]) not in params:
            raise CheckpointError(f"{file}: {key!r} names no parameter of the optimizer")
        param = params[int(parts[1])]
        if t.dim() and t.shape != param.shape:
            raise CheckpointError(f"{file}: {key} has shape {_shape(t)}, its parameter {_shape(param)}")


def read_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> _Checkpoint:
    """Read every file of the checkpoint at ``path`` and check it fits ``model`` and ``optimizer``, changing
    neither; raises ``CheckpointError`` naming the first file that is missing, unreadable or does not fit."""
    state = _read_state(path)
    weights = _read_tensors(path, MODEL_FILE, state)
    _check_weights(path / MODEL_FILE, weights, model)
    opt = _read_tensors(path, OPTIMIZER_FILE, state)
    _check_optimizer(path / OPTIMIZER_FILE, opt, state["optimizer"]["param_groups"], optimizer)
    rng = _read_tensors(path, RNG_FILE, state).get("torch")
    own_rng = torch.get_rng_state()
    if rng is None or rng.dtype != own_rng.dtype or rng.shape != own_rng.shape:
        raise CheckpointError(f"{path / RNG_FILE}: no torch RNG state of {own_rng.numel()} bytes")
    return _Checkpoint(state, weights, opt, rng)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``model``, ``optimizer`` and torch's RNG from the checkpoint at ``path``; returns its trainer
    state. Raises ``CheckpointError`` (and changes nothing) if any of its files is missing, unreadable or
    does not fit."""
    ckpt = read_checkpoint(path, model, optimizer)
    own = model.state_dict()
    try:
        model.load_state_dict({k: like(own[k], v) for k, v in ckpt.weights.items()}, strict=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path / MODEL_FILE}: does not fit the model ({str(e).splitlines()[0]})") from None
    try:
        load_optimizer_tensors(optimizer, ckpt.optimizer, ckpt.state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit the optimizer ({e})") from None
    torch.set_rng_state(ckpt.rng)
    state = dict(ckpt.state)
    del state["optimizer"]
    state.pop("files", None)
    return state


@dataclass
class Resumed:
    """What ``resume_checkpoint`` found: the checkpoint it loaded (None: there was none) with its trainer
    state, and the newer ones it could not load, each with why."""

    path: Path | None
    state: dict
    broken: list[tuple[Path, CheckpointError]]


def resume_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Resumed:
    """Load the newest checkpoint in ``folder`` that reads back whole and fits, skipping broken newer ones.
    With checkpoints there but none loadable, raises ``CheckpointError`` naming each one's problem rather
    than starting over: every one failing points at something systematic (another model, a bad disk) that
    hours of retraining would hide, and the user can move the folder away to start from scratch."""
    broken: list[tuple[Path, CheckpointError]] = []
    for path in checkpoints(folder):
        try:
            state = load_checkpoint(path, model, optimizer)
        except CheckpointError as e:
            broken.append((path, e))
            continue
        return Resumed(path, state, broken)
    if broken:
        problems = "; ".join(str(e) for _, e in broken)
        raise CheckpointError(f"no checkpoint in {folder} can be resumed from: {problems} "
                              f"(move {folder} away to train this phase from scratch)")  # fmt: skip
    return Resumed(None, {"step": 0}, [])


def set_aside(path: Path) -> Path:
    """Rename a broken checkpoint out of the way of the ones training will save (``broken_step_…``), to be
    inspected rather than overwritten; returns its new path."""
    target = path.with_name(f"{BROKEN_PREFIX}{path.name}")
    n = 1
    while target.exists():
        target = path.with_name(f"{BROKEN_PREFIX}{path.name}.{n}")
        n += 1
    path.rename(target)
    return target
