"""Where models run: ``--device auto|cuda|mps|cpu`` (or ``cuda:N``) for ask, benchmark, serve and train.

Processors make their tensors on the CPU, as transformers' do; a perceiver or a trainer moves them to its model's
device (``to_device``) and brings results back (``on_cpu``) before NumPy reads them. On CUDA, answering runs under
bf16 autocast where the GPU has bf16 (``answering``), and training where its recipe says bf16 (``autocast``);
weights stay float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

DEVICES = ("auto", "cuda", "mps", "cpu")


def resolve_device(name: str | torch.device = "cpu") -> torch.device:
    """The device ``name`` names: ``auto`` is CUDA where there is one, else Apple's MPS, else the CPU; a device this
    machine lacks is a ``ValueError`` saying what it has."""
    if isinstance(name, torch.device):
        name = str(name)
    kind = name.split(":", 1)[0]
    if kind not in DEVICES or (kind in ("auto", "mps", "cpu") and ":" in name):
        raise ValueError(f"unknown device {name!r}; use {', '.join(DEVICES)} or cuda:N")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _has_mps() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device that torch can use (it has: "
                             f"{', '.join(available_devices())})")  # fmt: skip
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if kind == "mps" and not _has_mps():
        raise ValueError(f"device 'mps': this machine has no MPS device (it has: {', '.join(available_devices())})")
    return torch.device(kind)


def _has_mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def available_devices() -> list[str]:
    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return [*cuda, *(["mps"] if _has_mps() else []), "cpu"]


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside it (in dicts, lists, tuples and dataclasses) on ``device``."""
    return _map_tensors(value, lambda t: t.to(device))


def on_cpu(value: Any) -> Any:
    """``value``'s tensors on the CPU, floating ones as float32 (what NumPy and the answers read)."""
    return _map_tensors(value, lambda t: t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu())


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _map_tensors(getattr(value, f.name), fn)
                                             for f in dataclasses.fields(value) if f.init})  # fmt: skip
    return value


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (none for None, or on MPS); weights stay float32."""
    if dtype is None or device.type not in ("cuda", "cpu"):
        yield
        return
    with torch.autocast(device.type, dtype=dtype):
        yield


def answering(device: torch.device) -> contextlib.AbstractContextManager:
    """How a perceiver answers on ``device``: bf16 autocast on a CUDA GPU with bf16 (float16's range is not the one the
    losses were tuned in), float32 elsewhere (the CPU's bf16 is emulated on many machines)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return autocast(device, torch.bfloat16 if bf16 else None)
