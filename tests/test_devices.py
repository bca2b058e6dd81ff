"""Where models run (``--device``): the names resolve to what this machine has, and every tensor that the models'
code makes while answering is made where the model is (``deviceless.py``; the training tests check training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from deviceless import DevicelessTensors

import perceive
from perceive.devices import on_cpu, resolve_device, to_device
from perceive.prompts import VisualPrompt

ROOT = Path(__file__).resolve().parents[1]


def test_device_names_resolve_to_what_this_machine_has():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    for bad in ("tpu", "cpu:1", "auto:0", ""):
        with pytest.raises(ValueError, match="unknown device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA device .*\(it has: cpu\)"):
            resolve_device("cuda:0")


def test_tensors_travel_inside_dicts_lists_and_dataclasses():
    @dataclasses.dataclass
    class Held:
        a: torch.Tensor
        b: list

    value = {"x": [Held(torch.ones(2, dtype=torch.bfloat16), [torch.zeros(1, dtype=torch.long), "text"])], "n": 3}
    moved = on_cpu(to_device(value, torch.device("cpu")))
    held = moved["x"][0]
    assert held.a.dtype == torch.float32 and held.b[0].dtype == torch.long and held.b[1] == "text" and moved["n"] == 3


def test_answering_makes_every_tensor_where_the_model_is():
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    asked = [("tiny", "Please detect the red circle in this image. Answer the question with object indexes.", None),
             ("mvp-tiny", "red circle, person", None),
             ("refvlm-tiny", "Please segment the red circle in this image.", None),
             ("refvlm-tiny", "What is <region>? Please give its box.",
              [VisualPrompt("box", [[10.0, 10.0], [60.0, 50.0]])])]  # fmt: skip
    for name, question, prompts in asked:
        perceiver = perceive.load(ROOT / "checkpoints" / name, device="cpu")
        assert perceiver.device == torch.device("cpu")
        with DevicelessTensors() as mode:
            perceiver.ask(image, question, prompts=prompts)
        assert not mode.sites, f"{name}: tensors made without a device at {sorted(mode.sites)}"


def test_a_device_or_sharding_the_run_cannot_have_is_one_line_before_any_work(tmp_path, capsys):
    from PIL import Image

    from perceive.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    Image.new("RGB", (32, 24)).save(tmp_path / "x.png")
    for command in (["ask", "--device", "cuda", str(tmp_path / "x.png"), "what?"],
                    ["train", "--config", "smoke", "--out", str(tmp_path / "run"), "--device", "cuda"]):  # fmt: skip
        assert main(command) == 1
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["train", "--config", "smoke", "--out", str(tmp_path / "run"), "--fsdp"]) == 1  # one process
    assert "run torchrun --nproc_per_node N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
