import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from deviceless import DevicelessTensors
from PIL import Image
from safetensors.torch import load_file

import perceive
from perceive.train import trainer
from perceive.train.trainer import RECIPES, autocast_dtype, train
from perceive.world.generator import WorldConfig, generate_scene


@pytest.fixture(scope="module")
def smoke_training(tmp_path_factory):
    """The smoke recipe trained, and where its models' code made a tensor without a device (``deviceless.py``)."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    with DevicelessTensors() as mode:
        train("smoke", out, progress=False)
    return out, mode.sites


@pytest.fixture(scope="module")
def smoke_run(smoke_training):
    return smoke_training[0]


def test_training_makes_every_tensor_where_the_model_is(smoke_training):
    assert not smoke_training[1], f"tensors made without a device at {sorted(smoke_training[1])}"


def test_smoke_training_writes_a_loadable_model(smoke_run):
    model = smoke_run / "model"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "upn/config.json", "upn/model.safetensors"):
        assert (model / f).is_file(), f
    assert (smoke_run / "loss_curve.png").is_file()
    rows = [json.loads(line) for line in (smoke_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["phase"] == "mllm"] == list(range(1, 7))
    assert [r["step"] for r in rows if r["phase"] == "upn_refine"] == list(range(1, 5))
    assert all(r["loss"] > 0 for r in rows)


def test_interrupted_training_resumes_to_the_same_weights(smoke_run, tmp_path):
    out = tmp_path / "resumed"
    train("smoke", out, progress=False, stop_after=3)  # stops inside the UPN phase
    assert not (out / "upn" / "model.safetensors").exists()
    train("smoke", out, progress=False, stop_after=3)  # finishes the UPN's first stage, stops in its refinement
    assert not (out / "upn" / "model.safetensors").exists()
    train("smoke", out, progress=False, stop_after=3)  # finishes the refinement, stops inside the MLLM phase
    assert not (out / "model").exists()
    train("smoke", out, progress=False)
    for weights in ("upn/model.safetensors", "model.safetensors"):
        a = load_file(str(smoke_run / "model" / weights))
        b = load_file(str(out / "model" / weights))
        assert a.keys() == b.keys()
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert worst < 1e-4, (weights, worst)


def test_mllm_seed_changes_the_mllm_and_not_the_upn(smoke_run, tmp_path):
    out = tmp_path / "seeded"
    train(dataclasses.replace(RECIPES["smoke"], mllm_seed=1), out, progress=False)
    assert RECIPES["smoke"].seed != 1 and json.loads((out / "recipe.json").read_text())["mllm_seed"] == 1
    for weights, equal in (("upn/model.safetensors", True), ("model.safetensors", False)):
        a, b = load_file(str(smoke_run / "model" / weights)), load_file(str(out / "model" / weights))
        assert all(torch.equal(a[k], b[k]) for k in a) == equal, weights


def test_a_recipe_asking_several_questions_a_scene_trains(smoke_run, tmp_path):
    out = tmp_path / "shared"
    shutil.copytree(smoke_run / "upn", out / "upn")  # the same UPN: only the MLLM phase runs
    train(dataclasses.replace(RECIPES["smoke"], questions_per_scene=2), out, progress=False)
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in rows)
    assert (out / "model" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="divide batch_size"):
        dataclasses.replace(RECIPES["smoke"], questions_per_scene=3)  # batch 4


def test_bf16_recipe_trains_and_falls_back_to_float32_without_bf16(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16")
    assert autocast_dtype("fp32") is None
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="float32"):
        assert autocast_dtype("bf16") is None
    monkeypatch.undo()
    if not trainer.cpu_has_bf16():
        pytest.skip("this CPU has no bf16 matrix instructions")
    assert autocast_dtype("bf16") is torch.bfloat16
    train(dataclasses.replace(RECIPES["smoke"], precision="bf16"), tmp_path / "bf16", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "train_log.jsonl").read_text().splitlines()]
    mllm = [r for r in rows if r["phase"] == "mllm"]
    assert len(mllm) == 6 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in mllm)
    weights = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())  # autocast leaves the weights in float32


@pytest.mark.slow
def test_two_process_data_parallel_with_gloo_and_the_mllm_sharded(tmp_path):
    """Under torchrun the UPN trains data-parallel and, with ``--fsdp``, the MLLM sharded over the two processes; the
    model is saved whole, under its own class name (that a sharded checkpoint resumes exactly:
    ``tests/test_sharding.py``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", "-m", "perceive.cli", "train", "--config", "smoke", "--out", str(out), "--fsdp",
                        "--quiet"], capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["phase"] == "mllm") == 6  # logged once, by rank 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["ChatRexForConditionalGeneration"]
    model = perceive.load(out / "model").model
    assert model.language_model.lm_head.weight.shape[0] == config["text_config"]["vocab_size"]


def _cli(*args):
    return run_cli(*args)


def test_ask_cli_json_and_picture(smoke_run, tmp_path):
    img = tmp_path / "scene.png"
    Image.fromarray(generate_scene(3, WorldConfig(size=128)).image).save(img)
    r = _cli(
        "ask",
        "--model",
        smoke_run / "model",
        img,
        "Please detect circle in this image.",
        "--json",
        "--out",
        tmp_path / "a.png",
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert set(data) >= {"answer", "objects", "proposals"}
    assert len(data["proposals"]) <= 100
    for o in data["objects"]:
        assert set(o) == {"phrase", "index", "box", "score"} and 0 <= o["score"] <= 1
        assert data["proposals"][o["index"]]["box"] == o["box"]
    assert (tmp_path / "a.png").is_file()
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = _cli("ask", "--model", smoke_run / "model", bad, "hello")
    assert r.returncode == 1 and "not an image" in r.stderr and "Traceback" not in r.stderr
    r = _cli("ask", "--model", tmp_path / "nowhere", img, "hello")
    assert r.returncode == 1 and "no such model folder" in r.stderr


def test_perceiver_api_edges(smoke_run):
    import numpy as np

    from perceive.perceiver import Perceiver

    p = Perceiver.from_pretrained(smoke_run / "model")
    image = generate_scene(5, WorldConfig(size=128)).image
    many = [[i % 100, 0, i % 100 + 10, 10] for i in range(130)]
    ans = p.ask(image, "Please detect star in this image.", boxes=many, scores=list(np.linspace(0, 1, 130)))
    assert len(ans.proposals) == 100 and "kept the 100 best-scoring" in ans.problems[0]
    assert ans.proposals[0]["score"] == pytest.approx(1.0)
    none = p.ask(image, "Please detect star in this image.", boxes=[])
    assert none.objects == []
    with pytest.raises(ValueError, match="tokens"):
        p.ask(image, "word " * 2000)
    with pytest.raises(ValueError, match="finite"):
        p.ask(image, "hi", boxes=[[5, 5, 1, 1]])
    gray = (image[..., 0]).copy()
    assert p.ask(gray, "Please detect star in this image.").text is not None
    assert p.detect(image, ["circle", "star"]).proposals == []  # a 4-step UPN scores nothing over min_score
    p.upn.config.min_score = 0.0
    assert p.detect(image, ["circle", "star"]).proposals
    assert p.describe(image, [0, 0, 50, 50]).proposals[0]["box"] == [0, 0, 50, 50]


def test_info_cli():
    r = _cli("info", "--config", "chatrex-7b", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert 7.5e9 < info["language model"] < 7.7e9 and info["total"] > 8e9
    memory = info["memory_gib"]  # bytes per parameter: 2 answering in bf16, 16 training with AdamW
    assert memory["answer bf16"] == pytest.approx(info["total"] * 2 / 2**30)
    assert memory["train bf16 mixed (AdamW)"] == pytest.approx(8 * memory["answer bf16"])
    assert memory["train bf16 mixed, FSDP over 8 GPUs (per GPU)"] == pytest.approx(memory["answer bf16"])


def test_the_benchmark_splits_are_apart_from_each_other_and_from_training():
    from perceive.eval.benchmark import SPLIT_SCENES, SPLIT_SEEDS, held_out_seed

    test, validation = ({held_out_seed(s, SPLIT_SCENES) + i for i in range(SPLIT_SCENES)} for s in SPLIT_SEEDS)
    assert not test & validation
    # training's scenes: the UPN's from seed 0 up (32,000 in the tiny recipe), the MLLM's from 1 * 1,000,003 up
    assert min(test | validation) > 100_000 and max(test | validation) < 1_000_003
    with pytest.raises(ValueError, match="unknown split"):
        held_out_seed("train", 10)
    with pytest.raises(ValueError, match="1 to 5000"):
        held_out_seed("test", SPLIT_SCENES + 1)


def test_benchmark_reports_every_task(smoke_run, tmp_path):
    from perceive.eval import benchmark
    from perceive.perceiver import Perceiver

    report = benchmark.run(Perceiver.from_pretrained(smoke_run / "model"), n=2, progress=False)
    assert set(report.metrics["targets"]) == set(benchmark.TARGETS)
    assert set(report.metrics["region_classification"]) == {"SS", "S-IoU"}
    assert "caption_brief_cider_d" in report.metrics and report.metrics["queries"] > 10
    tight = report.metrics["upn_tightness"]
    assert set(tight) == {"instance", "part"}
    assert tight["instance"]["R@0.75"] <= report.metrics["targets"]["UPN recall instances"]["measured"]
    assert all(0.0 <= v["mean best IoU"] <= 1.0 for v in tight.values())
    # every non-rejection expression counted once in its domain and once in its kind
    counts = report.metrics["humanref_counts"]
    kinds = {k.removeprefix("sub_domain:"): n for k, n in counts.items() if k.startswith("sub_domain:")}
    assert kinds.keys() == report.metrics["humanref_by_sub_domain"].keys()
    assert sum(kinds.values()) == counts["samples"] == sum(n for k, n in counts.items() if k.startswith("domain:"))
    benchmark.write(report, tmp_path)
    assert "targets" in (tmp_path / "benchmark.md").read_text()
    assert "referring by kind" in (tmp_path / "benchmark.md").read_text()
    assert json.loads((tmp_path / "benchmark.json").read_text())["scenes"] == 2

    # the results side by side: one column a folder, each kind with its number of expressions
    script = Path(__file__).parents[1] / "benchmarks" / "compare_results.py"
    r = subprocess.run([sys.executable, script, tmp_path, tmp_path, "--labels", "a", "b"],
                       capture_output=True, text=True, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in r.stdout.splitlines()}
    for kind, n in kinds.items():
        df1 = report.metrics["humanref_by_sub_domain"][kind]["DF1@0.5"]
        assert rows[kind].startswith(f"| {kind} | {n} | {100 * df1:.1f} | {100 * df1:.1f} |")
    bad = subprocess.run([sys.executable, script, tmp_path / "missing"], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "no such file" in bad.stderr
