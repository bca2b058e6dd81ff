"""MVP-LM: the matcher, the processor's spans, the world's masks, the tasks, the model (shapes, save/load parity,
learning), the perceiver's answers and bad questions, its training (resume parity) and its benchmark."""

from __future__ import annotations

import itertools
import random
import shutil

import numpy as np
import pytest
import torch

from perceive.boxes import coco_mask_to_array, rle_to_mask
from perceive.data.sources.world import WorldSource
from perceive.data.tasks_mvp import is_stuff, mvp_item
from perceive.eval.panoptic import mean_iou_with_unlabelled
from perceive.eval.referring import target_accuracies
from perceive.formats.mvp import PER, SENTENCE_TASK, WORD_TASK, sentence_instruction, word_instruction
from perceive.models.image_processing import ImageFrame
from perceive.models.matching import HungarianMatcher, dice_cost, dice_loss, mask_bce_cost, mask_bce_loss
from perceive.models.mvp.modeling_mvp import MvpForConditionalGeneration
from perceive.models.mvp.perceiver_mvp import MvpPerceiver
from perceive.models.mvp.processing_mvp import MvpProcessor, masks_to_image
from perceive.perceiver import ModelFolderError, load
from perceive.train.data import WorldStream
from perceive.train.mvp import MVP_RECIPES, MvpBatches, build_mvp_model, mvp_tokenizer, train_mvp
from perceive.train.task_batches import world_texts
from perceive.world.generator import WorldConfig

WORLD = WorldConfig(size=128, person_share=0.35, max_objects=4)
SMOKE = MVP_RECIPES["mvp-smoke"]


@pytest.fixture(scope="module")
def tokenizer():
    return mvp_tokenizer(world_texts(WORLD, 10))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)  # text_cross_attention on: its parts are exercised with everything else
    return build_mvp_model("mvp-tiny", tokenizer, **SMOKE.overrides, text_cross_attention=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("mvp") / "model"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def batches(model, tokenizer, tasks=None):
    return MvpBatches(MvpProcessor(tokenizer, model.config), WorldStream(WORLD, masks=True), 1,
                      tasks or dict(SMOKE.tasks))  # fmt: skip


# -- the matcher ---------------------------------------------------------------------------------------------------


def test_matcher_finds_the_least_cost_assignment():
    g = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    for _ in range(5):
        cost = torch.rand(5, 3, generator=g)
        qi, ti = matcher.match(cost)
        total = float(cost[qi, ti].sum()) * matcher.weights.cls
        best = min(sum(float(cost[q, t]) for q, t in zip(p, range(3), strict=True))
                   for p in itertools.permutations(range(5), 3))  # fmt: skip
        assert sorted(ti.tolist()) == [0, 1, 2]
        assert total == pytest.approx(best * matcher.weights.cls, abs=1e-5)


def test_matcher_keeps_groups_apart():
    cost = torch.zeros(4, 3)
    cost[2:, :2] = -10  # the cheapest pairs cross groups and must not be taken
    qi, ti = HungarianMatcher().match(
        cost, query_groups=torch.tensor([0, 0, 1, 1]), target_groups=torch.tensor([0, 0, 1])
    )
    groups_q = torch.tensor([0, 0, 1, 1])[qi]
    groups_t = torch.tensor([0, 0, 1])[ti]
    assert torch.equal(groups_q, groups_t) and sorted(ti.tolist()) == [0, 1, 2]


def test_mask_costs_are_the_pairwise_losses():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    targets = (torch.rand(2, 50, generator=g) > 0.5).float()
    dice, bce = dice_cost(logits, targets), mask_bce_cost(logits, targets)
    for q in range(3):
        for t in range(2):
            assert dice[q, t] == pytest.approx(float(dice_loss(logits[q : q + 1], targets[t : t + 1])), abs=1e-5)
            assert bce[q, t] == pytest.approx(float(mask_bce_loss(logits[q : q + 1], targets[t : t + 1])), abs=1e-5)


# -- metrics -------------------------------------------------------------------------------------------------------


def test_target_accuracies_follow_grefcoco():
    # no-target expressions: answered with 0, 2, 0 objects -> N-acc 2/3; with targets: 1, 0 -> T-acc 1/2
    out = target_accuracies([0, 0, 0, 2, 1], [0, 2, 0, 1, 0])
    assert out["N-acc"] == pytest.approx(2 / 3) and out["T-acc"] == pytest.approx(1 / 2)
    assert target_accuracies([1], [1])["N-acc"] is None


def test_unlabelled_pixels_are_misses_of_their_class():
    # two classes and "unlabelled": class 0 has 4 pixels, 3 right and 1 left unlabelled; class 1 has 2, both right
    confusion = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
    assert mean_iou_with_unlabelled(confusion) == pytest.approx((3 / 4 + 1.0) / 2)


# -- data ----------------------------------------------------------------------------------------------------------


def test_world_records_carry_masks_and_stuff():
    record = WorldSource(WORLD, masks=True).record(3)
    stuff = [i for i in record.instances if is_stuff(i)]
    things = [i for i in record.instances if not i.iscrowd and i.granularity == "instance"]
    assert stuff and things
    covered = np.zeros((record.height, record.width), dtype=bool)
    for inst in stuff + things:
        m = coco_mask_to_array(inst.mask, record.height, record.width)
        assert m.any() and not (covered & m).any()  # a panoptic partition: no pixel twice
        covered |= m
    assert covered.all()  # and every pixel once
    assert WorldSource(WORLD).record(3).instances[0].mask is None  # masks only when asked for


def test_tasks_name_every_target_and_shuffle_in_absent_names():
    record = WorldSource(WORLD, masks=True).record(5)
    item = mvp_item(record, "panoptic", random.Random(0))
    assert item is not None and item.instruction.kind == "word"
    regions = [i for i in record.instances if is_stuff(i) or (not i.iscrowd and i.granularity == "instance")]
    assert len(item.targets) == len(regions)
    assert {item.instruction.categories[t.label] for t in item.targets} == {i.category for i in regions}
    assert {t.stuff for t in item.targets} == {True, False}
    refer = mvp_item(record, "refer", random.Random(1))
    assert refer is not None and refer.instruction.kind == "sentence" and all(t.label == 0 for t in refer.targets)


def test_processor_spans_cover_each_name(model, tokenizer):
    proc = MvpProcessor(tokenizer, model.config)
    instruction = word_instruction(["red circle", "sky"])
    example = proc.example(instruction, "a red circle on the grass")
    tokens = tokenizer.convert_ids_to_tokens(example.ids)
    assert [tokens[a:b] for a, b in example.spans] == [["red", "circle"], ["sky"]]
    assert example.ids[example.per_index] == tokenizer.convert_tokens_to_ids(PER)
    prompt_length = len(proc.prompt(instruction)[0])
    assert all(v == -100 for v in example.labels[:prompt_length]) and example.labels[-1] == proc.eos_id


def test_masks_come_back_at_the_image_size():
    logits = torch.full((1, 16, 16), -5.0)
    logits[0, :8, :4] = 5.0  # the frame's top-left 8 x 4 cells: a 150-wide, 100-high image's left quarter, top half
    out = masks_to_image(logits, ImageFrame(150, 100)) > 0
    assert out.shape == (1, 100, 150)
    assert out[0, :70, :30].all() and not out[0, :, 45:].any()


# -- the model -----------------------------------------------------------------------------------------------------


def test_forward_backward_and_save_load_parity(model, tokenizer, folder):
    batch = batches(model, tokenizer).batch([0, 1])
    model.train()
    out = model(**batch)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert set(out.losses) == {"lm", "class", "mask", "dice", "l1", "giou"}
    out.loss.backward()
    assert model.per_mlp.layers[0].weight.grad is not None and model.pixel_decoder.lateral[0].weight.grad is not None
    assert model.layers[0].text_cross.in_proj_weight.grad is not None
    model.zero_grad()
    p = out.predictions[-1]
    q = model.config.num_queries
    assert p.masks.shape[:2] == (2, q) and p.boxes.shape == (2, q, 4) and p.background.shape == (2, q)
    assert len(out.predictions) == model.config.decoder_layers + 1
    model.eval()
    loaded = MvpForConditionalGeneration.from_pretrained(str(folder)).eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "targets")}
    with torch.no_grad():
        a, b = model(**inputs).predictions[-1], loaded(**inputs).predictions[-1]
    assert torch.allclose(a.masks, b.masks, atol=1e-5) and torch.allclose(a.boxes, b.boxes, atol=1e-6)


def test_the_decoder_reads_the_instructions_tokens_and_nothing_else(model):
    hidden = torch.randn(2, 7, model.config.text().hidden_size)
    spans = torch.tensor([[[1, 3], [4, 5]], [[2, 6], [0, 0]]])
    valid = torch.tensor([[True, True], [True, False]])
    tokens, padding = model.instruction_tokens(hidden, spans, valid)
    assert padding.tolist() == [[False, False, False, True], [False] * 4]
    assert torch.allclose(tokens[0, :3], model.word_proj(hidden[0, [1, 2, 4]]), atol=1e-6)
    assert torch.allclose(tokens[1], model.word_proj(hidden[1, 2:6]), atol=1e-6)


def test_a_tiny_model_learns(tokenizer):
    torch.manual_seed(0)
    m = build_mvp_model("mvp-tiny", tokenizer, **SMOKE.overrides)
    batch = batches(m, tokenizer, {"panoptic": 1.0}).batch([0, 1])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        out = m(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


# -- the perceiver -------------------------------------------------------------------------------------------------


def test_the_perceiver_answers_with_masks_at_the_image_size(folder):
    perceiver = load(folder)
    assert isinstance(perceiver, MvpPerceiver)
    image = WorldSource(WORLD, masks=True).record(2).image()[:100]  # 128 wide, 100 high
    perceiver.config.object_threshold = 0.0  # keep every query of the random model: shapes are what is checked
    answer = perceiver.ask(image, f"{WORD_TASK} circle, square")
    assert answer.objects and PER in answer.text
    for o in answer.objects:
        assert rle_to_mask(o.mask).shape == (100, 128) and o.phrase in ("circle", "square")
    result, _ = perceiver.panoptic(image, ["circle", "sky"])
    assert result.ids.shape == (100, 128)
    assert perceiver.panoptic_picture_for(image, f"{WORD_TASK} circle").size == (128, 100)
    assert perceiver.panoptic_picture_for(image, f"{SENTENCE_TASK} the circle") is None


def test_bad_questions_get_problems_not_crashes(folder):
    perceiver = load(folder)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    assert "empty" in perceiver.ask(image, f"{WORD_TASK} ").problems[-1]
    spelled = perceiver.ask(image, f"{WORD_TASK} zzqx, circle")
    assert not spelled.objects and "cannot spell" in spelled.problems[-1]
    twice = perceiver.ask(image, f"{WORD_TASK} circle, circle")
    assert "duplicate names were asked once" in twice.problems
    assert perceiver.ask(image, "the red circle").text  # no task description: a sentence
    with pytest.raises(ValueError, match="no boxes"):
        perceiver.ask(image, "the circle", boxes=[[0, 0, 5, 5]])


def test_a_broken_folder_is_named(folder, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(folder, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load(broken)
    shutil.copy(folder / "model.safetensors", broken / "model.safetensors")
    import json

    config = json.loads((broken / "config.json").read_text())
    config["decoder_dim"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="does not fit"):
        load(broken)


def test_sentence_and_word_instructions_are_read():
    from perceive.models.mvp.perceiver_mvp import read_instruction

    assert read_instruction("the red circles").sentence == "the red circles"
    assert read_instruction(f"{WORD_TASK} a, b").categories == ("a", "b")
    assert read_instruction(f"{SENTENCE_TASK} the cup").kind == "sentence"
    assert sentence_instruction("x").text == "x"


# -- training and the benchmark --------------------------------------------------------------------------------------


def test_training_resumes_to_the_same_weights(tmp_path):
    from deviceless import DevicelessTensors
    from safetensors.torch import load_file

    with DevicelessTensors() as mode:  # and makes every tensor where the model is
        train_mvp(SMOKE, tmp_path / "whole", progress=False)
    assert not mode.sites, f"tensors made without a device at {sorted(mode.sites)}"
    train_mvp(SMOKE, tmp_path / "split", progress=False, stop_after=2)
    assert not (tmp_path / "split" / "model").exists()
    train_mvp(SMOKE, tmp_path / "split", progress=False)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(load(tmp_path / "whole" / "model"), MvpPerceiver)


def test_the_benchmark_measures_every_metric(folder):
    from perceive.eval import mvp_benchmark

    records = [WorldSource(WORLD, masks=True).record(i) for i in (7, 8)]
    report = mvp_benchmark.run(load(folder), records, progress=False)
    m = report.metrics
    for key in ("PQ", "PQ things", "PQ stuff", "mIoU", "mask AP", "box AP", "referring cIoU", "referring gIoU",
                "T-acc", "REC Acc@0.5"):  # fmt: skip
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    assert set(m["DF1@0.5 by answer count"]) == {"1", "2-5", "6-10", ">10"}
    assert m["questions"] >= 4 and any(t.title == "Targets" for t in report.tables)


def test_the_command_trains_from_annotation_files_and_benchmarks_them(tmp_path, capsys):
    from perceive.cli import main
    from perceive.world.export import write_dataset

    write_dataset(tmp_path / "world", 4, 5, WorldConfig(size=96, max_objects=4), progress=False)
    assert main(["train", "--config", "mvp-smoke", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "world"),
                 "--quiet"]) == 0  # fmt: skip
    assert isinstance(load(tmp_path / "run" / "model"), MvpPerceiver)
    capsys.readouterr()
    assert main(["benchmark", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "world"), "--n",
                 "2", "--json", "--quiet"]) == 0  # fmt: skip
    import json

    metrics = json.loads(capsys.readouterr().out)
    assert metrics["records"] == 2 and 0.0 <= metrics["mask AP"] <= 1.0


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the web page's script")
def test_the_web_page_decodes_masks_as_pycocotools_encodes_them(tmp_path):
    import json
    import re
    import subprocess
    from pathlib import Path

    from perceive.boxes import mask_to_rle, mask_to_uncompressed_rle

    page = (Path(__file__).resolve().parents[1] / "perceive" / "serve" / "static" / "index.html").read_text()
    decoder = re.search(r"^function rleCounts\(s\) \{.*?^\}", page, re.S | re.M)
    assert decoder is not None
    mask = np.random.default_rng(0).random((37, 53)) > 0.6
    mask[5:30, 10:40] = True
    script = tmp_path / "decode.js"
    script.write_text(
        f"{decoder[0]}\nconsole.log(JSON.stringify(rleCounts({json.dumps(mask_to_rle(mask)['counts'])})));"
    )
    decoded = json.loads(subprocess.run(["node", str(script)], capture_output=True, text=True, check=True).stdout)
    assert decoded == mask_to_uncompressed_rle(mask)["counts"]


def test_the_shipped_checkpoint_finds_the_things_it_is_asked_for():
    from pathlib import Path

    from perceive.boxes import coco_mask_to_array

    shipped = Path(__file__).resolve().parents[1] / "checkpoints" / "mvp-tiny"
    perceiver = load(shipped)
    record = WorldSource(WorldConfig(size=256, person_share=0.35, relation_depth=2), masks=True).record(2)
    things = [i for i in record.instances if not i.iscrowd and i.granularity == "instance"]
    answer = perceiver.ask(record.image(), f"{WORD_TASK} " + ", ".join(sorted({i.category for i in things})))
    found = 0
    for inst in things:
        truth = coco_mask_to_array(inst.mask, record.height, record.width)
        ious = [(truth & rle_to_mask(o.mask)).sum() / (truth | rle_to_mask(o.mask)).sum()
                for o in answer.objects if o.phrase == inst.category]  # fmt: skip
        found += max(ious, default=0.0) > 0.5
    assert found >= len(things) - 1  # measured: all 6 of this scene's things, each by its name, mask IoU > 0.5
