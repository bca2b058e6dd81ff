"""Training against an unlucky disk: a corrupt latest checkpoint, a UPN folder half written when the run was
killed, a training log cut mid-line and resumed twice (issue 41, item 7)."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceive.models.upn.modeling_upn import UpnModel
from perceive.train import trainer
from perceive.train.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    atomic_folder,
    save_checkpoint,
)
from perceive.train.trainer import RECIPES, Distributed, loss_curve, train_upn

FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
DAMAGE = ("truncate", "garbage", "missing")
# the smoke recipe's UPN phase with room for two checkpoints (steps 2 and 4) before it ends, on half its batch
RECIPE = dataclasses.replace(RECIPES["smoke"], upn_steps=6, upn_refine_steps=2, upn_batch_size=2)


def damage(file, how):
    data = file.read_bytes()
    if how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":  # as long as the file was, so only its contents tell
        file.write_bytes(bytes((b * 7 + 13) % 256 for b in data))
    else:
        file.unlink()


def log_steps(out):
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["phase"], r["step"]) for r in rows]


def toy_run(out, stop_after=None):
    """The trainer's loop over a small model whose batches draw on torch's RNG (which a resume must restore)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step_fn(step):
        loss = model(torch.randn(4, 3)).square().mean() * (1 + step)
        loss.backward()
        return {"loss": loss.detach()}

    out.mkdir(parents=True, exist_ok=True)
    trainer._loop("toy", out, model, optimizer, 6, step_fn, 2, Distributed(), False, out / "train_log.jsonl",
                  stop_after)  # fmt: skip
    return model.state_dict()


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", FILES)
def test_a_corrupt_latest_checkpoint_is_named_set_aside_and_the_one_before_resumed(tmp_path, caplog, name, how):
    reference = toy_run(tmp_path / "reference")
    out = tmp_path / "run"
    toy_run(out, stop_after=4)  # checkpoints at steps 2 and 4
    damage(out / "checkpoints" / "toy" / "step_0000004" / name, how)
    with caplog.at_level(logging.WARNING, logger="perceive.train.trainer"):
        resumed = toy_run(out)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"step_0000004/{name}: " in warning and "\n" not in warning
    assert {"truncate": "truncated", "garbage": "corrupt", "missing": "missing"}[how] in warning or name == STATE_FILE
    assert "resuming toy from" in warning and warning.endswith("step_0000002")
    folders = sorted(p.name for p in (out / "checkpoints" / "toy").iterdir())
    assert folders == ["broken_step_0000004", "step_0000004", "step_0000006"]  # kept to inspect, not overwritten
    assert (out / "checkpoints" / "toy" / "broken_step_0000004" / name).exists() == (how != "missing")
    assert log_steps(out) == [("toy", s) for s in range(1, 7)]


def test_with_every_checkpoint_broken_training_stops_naming_each_and_moves_none(tmp_path):
    out = tmp_path / "run"
    toy_run(out, stop_after=4)
    folder = out / "checkpoints" / "toy"
    damage(folder / "step_0000004" / MODEL_FILE, "truncate")
    damage(folder / "step_0000002" / STATE_FILE, "missing")
    with pytest.raises(CheckpointError) as e:
        toy_run(out)
    message = str(e.value)
    assert "\n" not in message and f"move {folder} away" in message
    assert f"step_0000004/{MODEL_FILE}: " in message and f"step_0000002/{STATE_FILE}: missing" in message
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000002", "step_0000004"]


def test_a_checkpoint_of_another_model_does_not_fit(tmp_path):
    out = tmp_path / "run"
    toy_run(out, stop_after=2)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(
        CheckpointError,
        match=r"step_0000002/model.safetensors: does not fit the model: 0\.bias has shape \[4\], the model's \[5\]",
    ):
        trainer._loop("toy", out, model, torch.optim.AdamW(model.parameters()), 6, None, 2, Distributed(), False,
                      out / "train_log.jsonl")  # fmt: skip


def test_a_checkpoint_saved_before_checksums_still_resumes(tmp_path):
    reference = toy_run(tmp_path / "reference")
    out = tmp_path / "run"
    toy_run(out, stop_after=4)
    state_file = out / "checkpoints" / "toy" / "step_0000004" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["files"]  # as the code before this change wrote it
    state_file.write_text(json.dumps(state))
    resumed = toy_run(out)
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "model"
    with atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed while saving")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (final / "a.txt").read_text() == "old"
    with atomic_folder(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in final.iterdir()] == ["b.txt"]


def test_save_checkpoint_keeps_the_newest_two(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"phase": "toy"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000003"]


@pytest.fixture(scope="module")
def upn_reference(tmp_path_factory):
    """The UPN an uninterrupted run of ``RECIPE`` trains."""
    out = tmp_path_factory.mktemp("reference")
    train_upn(RECIPE, out, Distributed(), False, out / "train_log.jsonl")
    return load_file(str(out / "upn" / MODEL_FILE))


def assert_same_upn(reference, out):
    trained = load_file(str(out / "upn" / MODEL_FILE))
    assert trained.keys() == reference.keys()
    worst = max(float((reference[k] - trained[k]).abs().max()) for k in reference)
    assert worst < 1e-5, worst


@pytest.mark.slow
def test_a_run_resumed_past_a_cut_log_line_and_a_corrupt_checkpoint_trains_the_same_upn(
    upn_reference, tmp_path, caplog
):
    out = tmp_path / "run"
    out.mkdir()
    log = out / "train_log.jsonl"
    train_upn(RECIPE, out, Distributed(), False, log, stop_after=3)  # steps 1-3 logged, checkpoint at 2
    train_upn(RECIPE, out, Distributed(), False, log, stop_after=3)  # resumes at 2: steps 3-5, checkpoint at 4
    with open(log, "a") as f:
        f.write('{"phase": "upn", "step": 6, "loss": 1.2')  # the row a kill cut
    damage(out / "checkpoints" / "upn" / "step_0000004" / MODEL_FILE, "truncate")
    with caplog.at_level(logging.WARNING, logger="perceive.train.trainer"):
        train_upn(RECIPE, out, Distributed(), False, log)  # resumes at 2 again
    [warning] = [r.getMessage() for r in caplog.records]
    assert f"step_0000004/{MODEL_FILE}: " in warning and "truncated" in warning and warning.endswith("step_0000002")
    assert_same_upn(upn_reference, out)
    assert log_steps(out) == [("upn", s) for s in range(1, 7)] + [("upn_refine", s) for s in (1, 2)]
    with open(log, "a") as f:
        f.write('{"phase": "mllm", "st')
    loss_curve(log, out / "loss_curve.png")
    assert (out / "loss_curve.png").stat().st_size > 0


@pytest.mark.slow
def test_a_half_written_upn_folder_is_not_taken_as_trained(upn_reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()

    def killed_while_saving(self, folder, **kwargs):
        os.makedirs(folder, exist_ok=True)
        (Path(folder) / MODEL_FILE).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(UpnModel, "save_pretrained", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        train_upn(RECIPE, out, Distributed(), False, out / "train_log.jsonl")
    assert not (out / "upn").exists() and not (out / ".tmp_upn").exists()
    monkeypatch.undo()
    # what a SIGKILL mid-save leaves: the temporary folder, never renamed
    (out / ".tmp_upn").mkdir()
    (out / ".tmp_upn" / MODEL_FILE).write_bytes(b"\x00" * 100)
    train_upn(RECIPE, out, Distributed(), False, out / "train_log.jsonl")  # saves the UPN from its checkpoints
    assert not (out / ".tmp_upn").exists()
    assert_same_upn(upn_reference, out)


def test_a_corrupt_trained_upn_is_named_in_one_line(tmp_path):
    out = tmp_path / "run"
    (out / "upn").mkdir(parents=True)
    (out / "upn" / "config.json").write_text("{}")
    (out / "upn" / MODEL_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="the trained UPN cannot be loaded") as e:
        train_upn(RECIPE, out, Distributed(), False, out / "train_log.jsonl")
    assert str(out / "upn") in str(e.value) and "\n" not in str(e.value)
