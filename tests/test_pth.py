"""``.pth`` checkpoints are read with ``weights_only=True`` only: their weights convert to safetensors, and a
pickle that would run code is refused without running it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from perceive.models.pth import convert, read_pth
from perceive.perceiver import ModelFolderError


class Payload:
    """What an attacker's checkpoint holds: unpickling it would create a file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_convert_as_released_checkpoints_wrap_them(tmp_path):
    torch.manual_seed(0)
    shared = torch.randn(4, 3)
    weights = {"backbone.0.weight": shared, "head.weight": shared, "head.bias": torch.zeros(3, dtype=torch.float16)}
    args = argparse.Namespace(lr=1e-4, backbone="swin_L_384_22k")  # how DETR-family scripts save their arguments
    for name, saved in (("bare", weights), ("wrapped", {"model": weights, "epoch": 12, "args": args})):
        torch.save(saved, tmp_path / f"{name}.pth")
        tensors, size = convert(tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors")
        back = load_file(str(tmp_path / f"{name}.safetensors"))
        assert tensors == 3 and size == 4 * 3 * 4 * 2 + 3 * 2
        assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)
        assert back["head.bias"].dtype == torch.float16


def test_a_pickle_that_runs_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "RAN"
    torch.save({"model": {"w": torch.zeros(2)}, "hook": Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ModelFolderError, match=r"evil\.pth: refused: .*never runs a checkpoint's code"):
        read_pth(tmp_path / "evil.pth")
    command = [sys.executable, "-m", "perceive.cli", "convert", str(tmp_path / "evil.pth"),
               str(tmp_path / "evil.safetensors")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "refused" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def test_files_that_hold_no_weights_get_one_line(tmp_path):
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_weights.pth")
    with pytest.raises(ModelFolderError, match=r"holds no dict of tensors \(found: epoch, optimizer\)"):
        read_pth(tmp_path / "no_weights.pth")
    whole = tmp_path / "cut.pth"
    torch.save({"w": torch.zeros(1000)}, whole)
    whole.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(ModelFolderError, match="not a readable PyTorch checkpoint"):
        read_pth(whole)
    with pytest.raises(FileNotFoundError):
        read_pth(tmp_path / "missing.pth")
    done = subprocess.run([sys.executable, "-m", "perceive.cli", "convert", str(whole), str(tmp_path / "x.bin")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and ".safetensors" in done.stderr
