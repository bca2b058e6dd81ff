"""REF-VLM: TRP answers and their grammar, mask-guided aggregation, the decoders' parts and losses, the model
(routing, save/load parity, learning), generation's <REF> states, the perceiver's prompts and bad input, training
(resume parity), the keypoint metrics and the benchmark."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from perceive.boxes import rle_to_mask
from perceive.data.sources.world import WorldSource
from perceive.data.tasks_refvlm import REFVLM_TASKS, TEMPLATES, prompt_for, rasterize_prompt, refvlm_item
from perceive.eval.keypoints import keypoint_template, pck_hits, place_template
from perceive.formats import refvlm as trp
from perceive.models.generation import generate
from perceive.models.refvlm.grammar_refvlm import TrpGrammar
from perceive.models.refvlm.modeling_refvlm import (
    RefVlmForConditionalGeneration,
    box_area_targets,
    cosine_positions,
    expected_points,
    keypoint_loss,
)
from perceive.models.refvlm.perceiver_refvlm import RefVlmPerceiver
from perceive.models.refvlm.processing_refvlm import RefVlmProcessor
from perceive.perceiver import ModelFolderError, load
from perceive.prompts import VisualPrompt
from perceive.train.data import WorldStream
from perceive.train.refvlm import (
    REFVLM_RECIPES,
    RefVlmBatches,
    build_refvlm_model,
    refvlm_tokenizer,
    train_refvlm,
)
from perceive.train.task_batches import world_texts
from perceive.world.generator import WorldConfig

SMOKE = REFVLM_RECIPES["refvlm-smoke"]
WORLD = WorldConfig(**SMOKE.world)


@pytest.fixture(scope="module")
def tokenizer():
    return refvlm_tokenizer(world_texts(WORLD, 10))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)  # query_seed on: its parts and loss are exercised with everything else
    return build_refvlm_model("refvlm-tiny", tokenizer, **SMOKE.overrides, query_seed=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, tokenizer):
    path = tmp_path_factory.mktemp("refvlm") / "model"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def batches(model, tokenizer, tasks=None):
    return RefVlmBatches(RefVlmProcessor(tokenizer, model.config), WorldStream(WORLD, masks=True), 1,
                         tasks or dict(SMOKE.tasks))  # fmt: skip


def records(n: int = 6):
    source = WorldSource(WORLD, masks=True)
    return [source.record(i) for i in range(n)]


# -- answers and the grammar -------------------------------------------------------------------------------------


def test_every_task_answer_is_one_the_grammar_allows_and_parses_back(model, tokenizer):
    proc = RefVlmProcessor(tokenizer, model.config)
    grammar = TrpGrammar(tokenizer, len(tokenizer))
    perceiver = RefVlmPerceiver(model, tokenizer)
    seen = set()
    for record in records():
        for task in REFVLM_TASKS:
            item = refvlm_item(record, task, random.Random(0))
            if item is None:
                continue
            seen.add(task)
            answer = proc.answer(item)
            state = grammar.start()
            for k, token in enumerate(answer.ids[:-1]):
                assert bool(grammar.allowed(state, len(answer.ids) - k)[token]), (task, k)
                state = grammar.advance(state, token)
            assert bool(grammar.allowed(state, 1)[answer.ids[-1]])  # the end token closes it
            parsed = trp.parse(perceiver.render(state))
            assert not parsed.problems, (task, parsed.problems)
            assert parsed.num_refs == sum(len(g.targets) for g in item.groups) == len(answer.ref_units)
            assert [t.phrase for t in parsed.triplets if t.groups] == [g.name.lower() for g in item.groups]
            assert [tuple(u) for t in parsed.triplets for u in [t.units] for _ in t.ref_ordinals] == answer.ref_units
            if item.kind != "caption":
                assert parsed.task is not None and parsed.task.decode == bool(item.groups)
    assert seen == set(REFVLM_TASKS)


class RandomSession:
    """Logits from a seeded generator: what any model could say."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.logits = torch.randn((1, vocab), generator=self.g) * 4

    def step(self, tokens):
        self.logits = torch.randn((1, self.vocab), generator=self.g) * 4
        return self.logits


def test_generation_under_the_grammar_always_parses_within_the_budget(tokenizer, model):
    grammar = TrpGrammar(tokenizer, len(tokenizer))
    perceiver = RefVlmPerceiver(model, tokenizer)
    rng = random.Random(0)
    for seed in range(40):
        budget = rng.choice([12, 20, 40, 80, 200])
        session = RandomSession(len(tokenizer), seed)
        bias = torch.zeros(len(tokenizer))
        bias[[grammar.p.task_open, grammar.p.true, grammar.p.entry[0]] if seed % 2 else [grammar.p.phrase_open]] = 6
        session.logits = session.logits + bias
        gen = generate(session, grammar, [{}], budget)[0]
        assert gen.finished or len(gen.token_ids) == budget
        assert len(gen.token_ids) <= budget
        parsed = trp.parse(perceiver.render(perceiver.state_after(gen.token_ids)))
        assert not parsed.problems, (seed, parsed.problems)
        assert parsed.num_refs == gen.token_ids.count(grammar.p.ref)
        for t in parsed.triplets:
            for g in t.groups:
                assert list(g.labels) == list(range(len(g.labels)))


def test_a_tokenizer_that_cannot_spell_the_pieces_is_refused(tokenizer):
    from perceive.models.refvlm.processing_refvlm import TrpPieces
    from perceive.tokenization import build_world_tokenizer

    with pytest.raises(ValueError, match="cannot spell"):
        TrpPieces(build_world_tokenizer(["hello"]))
    TrpPieces(tokenizer)  # the tokenizer perceive builds spells every piece


# -- the parts ----------------------------------------------------------------------------------------------------


def test_mask_guided_aggregation_pools_each_cell_and_the_whole_mask(model):
    cfg = model.config
    g, r = cfg.prompt_grid, cfg.prompt_resolution
    c = 6
    feats = torch.randn(c, r, r)
    mask = torch.zeros(1, r, r)
    mask[0, 0, 0] = mask[0, r - 1, r - 1] = 1  # two pixels in opposite cells
    out = model.region_tokens(feats, mask)
    assert out.shape == (1, g * g + 1, c)
    pe = cosine_positions(g * g + 1, c, cfg.prompt_temperature, feats.device)
    torch.testing.assert_close(out[0, 0] - pe[0], feats[:, 0, 0] / 2)
    torch.testing.assert_close(out[0, g * g - 1] - pe[g * g - 1], feats[:, r - 1, r - 1] / 2)
    torch.testing.assert_close(out[0, -1] - pe[-1], (feats[:, 0, 0] + feats[:, r - 1, r - 1]) / 2)
    torch.testing.assert_close(pe[:, 0], torch.arange(g * g + 1).float().cos())


def test_prompts_are_rasterised_where_they_point():
    box = rasterize_prompt(VisualPrompt("box", points=[(2, 3), (6, 8)]), 20, 20)
    assert box.sum() == 4 * 5 and box[3, 2] and not box[8, 6]
    point = rasterize_prompt(VisualPrompt("point", points=[(10, 10)]), 64, 64)
    assert point[10, 10] and point.sum() < 30
    line = rasterize_prompt(VisualPrompt("scribble", points=[(5, 5), (50, 5)]), 64, 64)
    assert line[5, 5] and line[5, 30] and line[5, 50] and not line[40, 30]
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    for kind in ("point", "box", "scribble", "mask"):
        p = prompt_for(kind, mask, [2, 2, 4, 4], random.Random(0))
        assert rasterize_prompt(p, 8, 8)[2:4, 2:4].any()


def test_box_areas_heatmaps_and_keypoint_loss_follow_their_definitions():
    areas = box_area_targets(torch.tensor([[0.5, 0.5, 0.5, 0.25]]), 4)  # x 0.25..0.75, y 0.375..0.625 of 4 cells
    expected = torch.zeros(4, 4)
    expected[1:3, 1:3] = 0.5  # half of each of rows 1 and 2 is covered
    torch.testing.assert_close(areas[0], expected)
    heat = torch.full((1, 1, 8, 8), -1e4)
    heat[0, 0, 2, 5] = 0.0
    torch.testing.assert_close(expected_points(heat)[0, 0], torch.tensor([5.5 / 8, 2.5 / 8]))
    heatmaps = torch.randn(1, 2, 8, 8)
    visible = torch.tensor([[2.0, -1.0]])
    targets = torch.tensor([[[5.5 / 8, 2.5 / 8, 2], [0.1, 0.1, 0]]])
    ce = torch.nn.functional.cross_entropy(heatmaps[0, 0].reshape(1, -1), torch.tensor([2 * 8 + 5]))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(visible, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(keypoint_loss(heatmaps, visible, targets), ce + bce)


def test_keypoint_metrics_follow_their_definitions():
    gt = [[10, 10, 2], [20, 20, 1], [0, 0, 0]]
    box = [0, 0, 100, 50]  # PCK@0.1 reach: 10 pixels
    assert pck_hits(gt, [[15, 10, 2], [20, 35, 2], [90, 90, 2]], box) == (1, 2)
    assert pck_hits(gt, None, box) == (0, 2)
    template = keypoint_template(
        [([0, 0, 10, 10], [[5, 5, 2], [0, 0, 0]]), ([10, 10, 30, 30], [[10, 30, 2], [0, 0, 0]])]
    )
    np.testing.assert_allclose(template, [[0.25, 0.75], [0.5, 0.5]])
    assert place_template(template, [0, 0, 4, 8]) == [[1.0, 6.0, 2], [2.0, 4.0, 2]]


def test_oks_ap_comes_from_pycocotools():
    from pycocotools.coco import COCO

    from perceive.eval.keypoints import keypoint_ap

    kps = [[10 + 2 * k, 20 + 3 * k, 2] for k in range(17)]
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "width": 100, "height": 100}],
                  "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [10, 20, 40, 60],
                                   "area": 2400.0, "keypoints": [v for k in kps for v in k], "num_keypoints": 17}],
                  "categories": [{"id": 1, "name": "person"}]}  # fmt: skip
    gt.createIndex()
    exact = [{"image_id": 1, "category_id": 1, "score": 0.9, "keypoints": [float(v) for k in kps for v in k]}]
    assert keypoint_ap(gt, exact)["AP"] == pytest.approx(1.0)
    off = [
        {**exact[0], "keypoints": [float(v) + (6 if i % 3 == 0 else 0) for i, v in enumerate(exact[0]["keypoints"])]}
    ]
    assert keypoint_ap(gt, off)["AP"] < 1.0 and keypoint_ap(gt, [])["AP"] == 0.0


def test_gcg_scores_follow_glamms_definitions():
    from perceive.eval.grounded_captions import gcg_scores

    def overlap(a, b):  # word overlap stands in for the sentence encoder: the definition is what is checked
        return np.array([[len(set(x.split()) & set(y.split())) / len(set(x.split()) | set(y.split())) for y in b]
                         for x in a])  # fmt: skip

    gt = [("red circle", [0, 0, 10, 10]), ("square", [20, 20, 30, 30])]
    pred = [("square", [20, 20, 30, 30]), ("a red circle", [0, 0, 10, 5])]  # the circle's box: IoU 0.5 exactly
    scores = gcg_scores([(gt, pred), ([("cup", [0, 0, 4, 4])], [])], similarity=overlap)
    assert scores["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert scores["recall"] == pytest.approx(1 / 3)  # recall needs IoU above 0.5: the circle is not recalled
    assert scores["AP50"] == pytest.approx(2 / 3, abs=0.02)  # two of three regions found, none wrong
    wide = gcg_scores([(gt, [("square", [20, 20, 30, 30]), ("a red circle", [0, 0, 10, 9])])], similarity=overlap)
    assert wide["recall"] == 1.0  # IoU 0.9 and 2 of 3 words shared: recalled


# -- the model ----------------------------------------------------------------------------------------------------


def test_forward_backward_routes_every_unit_and_save_load_parity(model, tokenizer, folder):
    b = batches(model, tokenizer, {"keypoint": 1.0, "refer_mask": 1.0, "interactive": 1.0})
    batch = b.batch([0, 1, 2, 3])
    model.train()
    out = model(**batch)
    assert set(out.losses) == {"lm", "box", "mask", "keypoint", "grounding"} and torch.isfinite(out.loss)
    out.loss.backward()
    for u in ("box", "mask", "keypoint"):
        assert model.decoders[u].in_proj.layers[0].weight.grad is not None, u
    assert model.selector.layers[0].weight.grad is not None and model.memory_key.weight.grad is not None
    model.zero_grad()
    only_boxes = batches(model, tokenizer, {"refer_box": 1.0}).batch([0, 1])
    out = model(**only_boxes)
    assert float(out.losses["keypoint"].detach()) == 0.0 and float(out.losses["mask"].detach()) == 0.0
    out.loss.backward()  # the idle decoders still run: their parameters are in the graph
    assert model.decoders["keypoint"].in_proj.layers[0].weight.grad is not None
    model.zero_grad()
    model.eval()
    loaded = RefVlmForConditionalGeneration.from_pretrained(str(folder)).eval()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "targets")}
    with torch.no_grad():
        a, c = model(**inputs).units["mask"].layers[-1], loaded(**inputs).units["mask"].layers[-1]
    assert torch.allclose(a.masks, c.masks, atol=1e-5)


def test_query_seeds_point_at_the_phrases_targets_and_the_prompts(model):
    from perceive.models.refvlm.modeling_refvlm import Selection

    torch.manual_seed(0)
    cfg = model.config
    image = model.encode_image(torch.rand(1, 3, cfg.low_resolution, cfg.low_resolution),
                               torch.rand(1, 3, cfg.high_resolution, cfg.high_resolution))  # fmt: skip
    sizes = image["memory_sizes"]
    m = int(sizes.prod(-1).sum())
    assert image["memory"].shape[1] == m
    # two phrases: <REF> 0 and 1 belong to phrase 0 (targets 0 and 1), <REF> 2 to phrase 1 (target 2, a box only)
    masks = torch.zeros(3, 32, 32)
    masks[0, :16, :16] = 1
    masks[1, 16:, 16:] = 1
    t = {
        "boxes": torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5], [0.25, 0.75, 0.5, 0.5]]),
        "masks": masks,
        "has_mask": torch.tensor([True, True, False]),
        "groups": torch.tensor([0, 0, 1]),
        "ref_groups": torch.tensor([0, 0, 1]),
    }
    cover = torch.stack([masks[0], masks[1], torch.zeros(32, 32)])
    cover[2, 16:, :16] = 1  # the box's area
    goal = model.memory_maps(cover, sizes)
    union = torch.stack([torch.maximum(goal[0], goal[1]), torch.maximum(goal[0], goal[1]), goal[2]])
    right = Selection([(union * 2 - 1) * 30], [torch.zeros(3, cfg.decoder_dim)])
    wrong = Selection([(1 - union * 2) * 30], [torch.zeros(3, cfg.decoder_dim)])
    assert float(model.grounding_loss(right, sizes, [t])) < 1e-3 < float(model.grounding_loss(wrong, sizes, [t]))
    # a <REF> starts from the memory its scores select, plus the memory inside the question's visual prompts
    states = [torch.randn(2, cfg.text().hidden_size)]
    plain = model.select(states, image)
    r = cfg.prompt_resolution
    left, right_half = torch.zeros(1, r, r), torch.zeros(1, r, r)
    left[:, :, : r // 2], right_half[:, :, r // 2 :] = 1, 1
    a, b = model.select(states, image, [left]), model.select(states, image, [right_half])
    assert torch.allclose(plain.scores[0], a.scores[0]) and not torch.allclose(a.seeds[0], b.seeds[0])
    w = model.memory_maps(left, sizes)[0]
    assert torch.allclose(a.seeds[0] - plain.seeds[0], (w / w.sum()) @ image["memory"][0], atol=1e-5)


def test_a_tiny_model_learns(tokenizer):
    torch.manual_seed(0)
    m = build_refvlm_model("refvlm-tiny", tokenizer, **SMOKE.overrides)
    batch = batches(m, tokenizer, {"refer_box": 1.0, "interactive": 1.0, "keypoint": 1.0}).batch([0, 1, 2])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        out = m(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.6 * losses[0]


def test_generation_keeps_the_ref_states_the_teacher_forced_pass_has(folder):
    perceiver = load(folder)
    perceiver.max_new_tokens = 60
    encoded = perceiver.encode_batch([records(1)[0].image()])[0]
    grammar = perceiver.grammar
    bias = torch.zeros(len(perceiver.tokenizer))
    p = grammar.p
    bias[[p.unit_close, p.task_close, p.numbers[2]]] = 50.0
    # <Task> first, then True; the name's one word is "2" (name_first cannot end it), then "Unit:" outbids it
    bias[p.task_open], bias[p.unit_lead[0]], bias[p.true] = 60.0, 55.0, 40.0
    lm_head = perceiver.model.language_model.lm_head
    original = lm_head.forward
    lm_head.forward = lambda x: original(x) + bias  # steer the random model to a plan with two <REF>s
    try:
        decoded = perceiver.generate(encoded, TEMPLATES["detect"], [])
        tokens = perceiver.tokenizer(decoded.text, add_special_tokens=False)["input_ids"]
    finally:
        lm_head.forward = original
    assert decoded.parsed.num_refs >= 2 and not decoded.problems
    proc = perceiver.processor
    ids = torch.tensor([proc.prompt(TEMPLATES["detect"], 0) + tokens])
    with torch.no_grad():
        out = perceiver.model.language_model(inputs_embeds=perceiver.model.embed(ids, encoded.image, [None]),
                                             output_hidden_states=True)  # fmt: skip
    forced = out.hidden_states[-1][0, ids[0] == proc.pieces.ref]
    model = perceiver.model
    words = model.text_memory(torch.stack(out.hidden_states).mean(0), model.text_positions(ids))
    box = decoded.routed["box"]
    again = perceiver.decode_refs(decoded.text, forced, encoded, words).routed["box"]
    torch.testing.assert_close(box.layers[-1].boxes, again.layers[-1].boxes, atol=1e-4, rtol=1e-4)


# -- the perceiver ------------------------------------------------------------------------------------------------


def test_the_perceiver_answers_with_prompts_and_refuses_bad_ones(folder):
    perceiver = load(folder)
    assert isinstance(perceiver, RefVlmPerceiver)
    perceiver.max_new_tokens = 40
    image = records(1)[0].image()[:100]  # 128 wide, 100 high
    answer = perceiver.ask(image, TEMPLATES["interactive"], prompts=[VisualPrompt("point", points=[(30, 40)])])
    assert not answer.problems and trp.parse(answer.text).problems == ()
    for o in answer.objects:
        assert len(o.box) == 4 and (o.mask is None or rle_to_mask(o.mask).shape == (100, 128))
    with pytest.raises(ValueError, match="placeholders"):
        perceiver.ask(image, TEMPLATES["interactive"])
    with pytest.raises(ValueError, match="placeholders"):
        perceiver.ask(image, TEMPLATES["detect"], prompts=[VisualPrompt("point", points=[(3, 4)])])
    with pytest.raises(ValueError, match="outside"):
        perceiver.ask(image, TEMPLATES["interactive"], prompts=[VisualPrompt("point", points=[(300, 4)])])
    with pytest.raises(ValueError, match="two points"):
        VisualPrompt("scribble", points=[(3, 4)])
    with pytest.raises(ValueError, match="empty"):
        VisualPrompt("mask", mask=np.zeros((100, 128), dtype=bool))
    with pytest.raises(ValueError, match="no boxes"):
        perceiver.ask(image, "the circle", boxes=[[0, 0, 5, 5]])


def test_decoders_given_no_queries_give_no_objects(folder):
    perceiver = load(folder)
    encoded = perceiver.encode_batch([np.zeros((64, 64, 3), dtype=np.uint8)])[0]
    decoded = perceiver.decode_refs("nothing to decode", None, encoded)
    assert perceiver.objects(decoded, encoded.frame) == [] and decoded.routed["box"].index == [[]]
    broken = perceiver.decode_refs("<Phrase>a</Phrase>(<Unit>box</Unit>[0]<REF>", None, encoded)
    assert broken.problems and perceiver.objects(broken, encoded.frame) == []


def test_a_broken_folder_is_named(folder, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    config["decoder_dim"] = 64
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="does not fit"):
        load(broken)


# -- training, the command line and the benchmark ---------------------------------------------------------------


def test_training_resumes_to_the_same_weights(tmp_path):
    from deviceless import DevicelessTensors
    from safetensors.torch import load_file

    with DevicelessTensors() as mode:  # and makes every tensor where the model is
        train_refvlm(SMOKE, tmp_path / "whole", progress=False)
    assert not mode.sites, f"tensors made without a device at {sorted(mode.sites)}"
    train_refvlm(SMOKE, tmp_path / "split", progress=False, stop_after=2)
    assert not (tmp_path / "split" / "model").exists()
    train_refvlm(SMOKE, tmp_path / "split", progress=False)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "split" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(load(tmp_path / "whole" / "model"), RefVlmPerceiver)


def test_the_benchmark_measures_every_metric(folder):
    from perceive.eval import refvlm_benchmark

    perceiver = load(folder)
    perceiver.max_new_tokens = 40
    source = WorldSource(WORLD, masks=True)
    measured = [r for r in (source.record(i) for i in range(20, 40)) if any(i.keypoints for i in r.instances)][:2]
    report = refvlm_benchmark.run(perceiver, measured, progress=False, template_records=records(4))
    m = report.metrics
    for key in ("answers parse cleanly", "answers with the right <REF> count", "RES cIoU", "RES gIoU",
                "IG mIoU (point)", "IG mIoU (mask)", "keypoint OKS AP", "PCK@0.1"):  # fmt: skip
        assert m[key] is not None and 0.0 <= m[key] <= 1.0, key
    assert m["answers parse cleanly"] == 1.0
    assert set(m["DF1@0.5 by answer count"]) == {"1", "2-5", "6-10", ">10"}
    assert m["teacher-forced"]["IG mIoU (box)"] is not None and any(
        t.title.startswith("Targets") for t in report.tables
    )


def test_the_command_line_trains_from_files_asks_with_prompts_and_describes_the_real_size(tmp_path, capsys):
    from PIL import Image

    from perceive.cli import main
    from perceive.world.export import write_dataset

    write_dataset(tmp_path / "world", 4, 5, WorldConfig(size=96, max_objects=4, person_share=0.5), progress=False)
    assert main(["train", "--config", "refvlm-smoke", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "world"),
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    image = tmp_path / "scene.png"
    Image.fromarray(records(1)[0].image()).save(image)
    code = main(["ask", "--model", str(tmp_path / "run" / "model"), str(image), TEMPLATES["interactive"], "--prompt",
                 "box:10,10,60,60", "--json"])  # fmt: skip
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert "problems" not in answer and trp.parse(answer["answer"]).problems == ()  # a 4-step model: any text, parsed
    assert main(["info", "--config", "refvlm-7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 6.5e9 < info["total"] < 8.5e9


def test_the_server_passes_visual_prompts_and_refuses_bad_ones(folder):
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from perceive.serve.app import create_app

    perceiver = load(folder)
    perceiver.max_new_tokens = 30
    buf = io.BytesIO()
    Image.fromarray(records(1)[0].image()).save(buf, format="PNG")
    client = TestClient(create_app(perceiver))
    image = {"image": ("s.png", buf.getvalue(), "image/png")}
    good = json.dumps([{"kind": "box", "points": [[10, 10], [60, 50]]}])
    r = client.post("/v1/ask", files=image, data={"question": TEMPLATES["interactive"], "prompts": good})
    assert r.status_code == 200, r.text
    assert trp.parse(r.json()["answer"]).problems == ()
    for prompts, needle in ((json.dumps([{"kind": "box", "points": [[10, 10]]}]), "x0,y0,x1,y1"),
                            ("[1]", "kind point, box or scribble"), ("not json", "prompts"),
                            (json.dumps([{"kind": "point", "points": [[900, 10]]}]), "outside")):  # fmt: skip
        r = client.post("/v1/ask", files=image, data={"question": TEMPLATES["interactive"], "prompts": prompts})
        assert r.status_code == 400 and needle in r.json()["detail"], (prompts, r.text)
    r = client.post("/v1/ask", files=image, data={"question": TEMPLATES["detect"], "prompts": good})
    assert r.status_code == 400 and "placeholders" in r.json()["detail"]


def test_the_shipped_checkpoint_answers_in_triplets_with_keypoints():
    from perceive.perceiver import DEFAULT_MODEL

    folder = DEFAULT_MODEL.parent / "refvlm-tiny"
    perceiver = load(folder)
    assert isinstance(perceiver, RefVlmPerceiver) and perceiver.config.box_readout == "dense"
    source = WorldSource(WorldConfig(**REFVLM_RECIPES["refvlm-tiny"].world), masks=True)
    record = next(r for r in (source.record(i) for i in range(5_000_000, 5_000_050))
                  if any(i.keypoints for i in r.instances))  # fmt: skip
    answer = perceiver.ask(record.image(), TEMPLATES["keypoint"])
    assert not answer.problems and trp.parse(answer.text).task.decode
    assert answer.objects and all(len(o.keypoints) == 17 for o in answer.objects)
    for o in answer.objects:
        x0, y0, x1, y1 = o.box
        assert 0 <= x0 < x1 <= record.width and 0 <= y0 < y1 <= record.height
