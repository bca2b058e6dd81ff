"""A check that models' code makes every tensor where the model is, without a GPU: a tensor made without a device
lands on the CPU whatever the model's device is, so ``DevicelessTensors`` (a torch function mode) records each factory
call (``torch.zeros``, ``torch.tensor``, ...) that names no device and comes from the models' code at run time (not
while a module is being built). Processors make CPU tensors on purpose and are not watched; perceivers and trainers
move them. Used by ``test_devices.py`` (answering) and by the training tests of each model (``test_train.py``,
``test_mvp.py``, ``test_refvlm.py``)."""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode

FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.as_tensor, torch.eye,
             torch.linspace, torch.rand, torch.randn}  # fmt: skip
# code that runs on the model's device; processors (processing_*, image_processing) make CPU tensors by design
MODEL_CODE = ("modeling_", "perceiver_", "generation.py", "pixel_decoder.py", "object_encoder.py", "vision.py",
              "anchor_pointer.py", "object_relation.py", "object_order.py", "matching.py", "convnext.py")  # fmt: skip


class DevicelessTensors(TorchFunctionMode):
    """Records ``file:line`` of each factory call without a device made from the models' code at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            name = "" if frame is None else frame.f_code.co_filename
            if "/perceive/models/" in name and any(m in name for m in MODEL_CODE) and not _building(frame):
                self.sites.add(f"{name.split('/perceive/')[-1]}:{frame.f_lineno}")  # type: ignore[union-attr]
        return func(*args, **kwargs)


def _building(frame) -> bool:
    """Whether the call is part of building a module (its parameters are made on the CPU, then moved whole)."""
    while frame is not None:
        if frame.f_code.co_name in ("__init__", "_init_weights") and isinstance(frame.f_locals.get("self"),
                                                                                torch.nn.Module):  # fmt: skip
            return True
        frame = frame.f_back
    return False
