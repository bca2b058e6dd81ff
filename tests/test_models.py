import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceive.boxes import box_iou
from perceive.formats import chatrex
from perceive.models.anchor_pointer import ANCHOR_GEOMETRY
from perceive.models.configuration_perceiver import ATTRIBUTES, HOLDING_ATTRIBUTES, TINY, PerceiverConfig, named_config
from perceive.models.decoding import GrammarMasks, _index_or_stop, generate
from perceive.models.modeling_perceiver import PerceiverForRetrieval, box_coordinates, box_position_embedding
from perceive.models.modeling_upn import UpnConfig, UpnModel
from perceive.models.object_order import order_features
from perceive.perceiver import DEFAULT_MODEL, Perceiver
from perceive.processing import IGNORE, ImageFrame, PerceiverProcessor
from perceive.tokenization import detokenize
from perceive.train.data import ATTRIBUTE_TARGETS, WorldTasks, attribute_targets, order_target
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import NounPhrase, evaluate
from perceive.world.scene import COLORS, ITEMS

WORLD = WorldConfig(size=128, person_share=0.35, max_objects=5)


def _model(cfg, **kw):
    torch.manual_seed(0)
    c = PerceiverConfig(**{**cfg.to_dict(), **kw})
    return PerceiverForRetrieval(c)


def test_upn_shapes_loss_proposals_and_save_load(tmp_path):
    torch.manual_seed(0)
    upn = UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, max_proposals=7))
    x = torch.randn(2, 3, 64, 64)
    out = upn(x)
    assert out["scores"].shape == (2, 2, 16, 16) and out["boxes"].shape == (2, 4, 16, 16)
    tg = upn.targets([torch.tensor([[4.0, 4.0, 20.0, 30.0]]), torch.zeros(0, 4)], [torch.tensor([0]),
                     torch.zeros(0, dtype=torch.long)], 16)  # fmt: skip
    assert tg["heat"][0, 0].max() == 1.0 and tg["mask"].sum() == 1
    loss = upn.loss(out, tg)
    assert torch.isfinite(loss["loss"])
    props = upn.propose(x)
    assert all(len(p["boxes"]) <= 7 and (p["scores"][:-1] >= p["scores"][1:]).all() for p in props)
    upn.save_pretrained(tmp_path)
    again = UpnModel.from_pretrained(tmp_path)
    assert torch.allclose(again(x)["scores"], out["scores"])


def test_upn_cross_granularity_suppression():
    """A fine box that nearly repeats a better coarse box goes; a distant fine box stays."""
    cfg = dict(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, min_score=0.1)
    scores = torch.full((1, 2, 16, 16), -10.0)
    scores[0, 0, 5, 5] = 3.0  # coarse peak
    scores[0, 1, 5, 6] = 2.0  # fine peak one cell (4 px) to the right: IoU 28/36 = 0.78 with the coarse box
    scores[0, 1, 12, 12] = 1.0  # fine peak far away
    boxes = torch.zeros(1, 4, 16, 16)
    boxes[0, :2] = 0.5  # centred in the cell
    boxes[0, 2:] = math.log(32 / 4)  # 32 x 32 px boxes
    outputs = {"scores": scores, "boxes": boxes}

    def proposals(threshold):
        upn = UpnModel(UpnConfig(**cfg, cross_granularity_iou=threshold))
        upn.forward = lambda pixel_values: outputs
        return upn.propose(torch.zeros(1, 3, 64, 64))[0]

    assert proposals(None)["granularity"].tolist() == [0, 1, 1]
    kept = proposals(0.7)
    assert kept["granularity"].tolist() == [0, 1] and kept["boxes"][1, 0] > 32  # the distant one
    assert len(proposals(0.8)["boxes"]) == 3  # 0.78 is not above 0.8
    with pytest.raises(ValueError, match="cross_granularity_iou"):
        UpnConfig(cross_granularity_iou=1.5)


def test_box_refinement_deltas_round_trip_and_are_capped():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 8.0]])
    truth = torch.tensor([[12.0, 18.0, 36.0, 50.0], [1.0, 2.0, 9.0, 12.0]])
    deltas = UpnModel.target_deltas(boxes, truth)
    assert torch.allclose(deltas[0], torch.tensor([4 / 20, -6 / 40, math.log(24 / 20), math.log(32 / 40)]))
    assert torch.allclose(UpnModel.apply_deltas(boxes, deltas), truth, atol=1e-5)
    wild = UpnModel.apply_deltas(boxes[:1], torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    assert torch.allclose(wild[0, 2] - wild[0, 0], torch.tensor(20 * math.e)), wild  # at most e times wider
    assert torch.allclose(wild[0, 3] - wild[0, 1], torch.tensor(40 / math.e))


def test_box_refinement_learns_and_survives_save_load(tmp_path):
    """A few steps of the refinement (first stage frozen) on one scene lower its loss, the proposals
    change with it, and a saved UPN proposes the same boxes after loading."""
    cfg = UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16, min_score=0.0,
                    box_refinement=True, refine_grid=3)  # fmt: skip
    torch.manual_seed(0)
    upn = UpnModel(cfg)
    x = torch.zeros(1, 3, 64, 64)
    x[0, :, 10:26, 20:50] = 1.0  # a 30 x 16 px bright rectangle
    truth = [torch.tensor([[20.0, 10.0, 50.0, 26.0]])]
    before = upn.propose(x)[0]["boxes"]
    params = [p for n, p in upn.named_parameters() if n.startswith("refine.")]
    opt = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():
        out = upn(x)
    losses = []
    for _ in range(60):
        loss = upn.refinement_loss(out, x, truth)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    after = upn.propose(x)[0]["boxes"]
    assert after.shape == before.shape and not torch.allclose(after, before)
    assert upn.refinement_loss(out, x, [torch.zeros(0, 4)]).item() == 0.0  # no objects: nothing to learn
    # refinement runs once over a batch's candidates: each image gets what it gets alone
    other = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batched = upn.propose(torch.cat([other, x]))
    alone = upn.propose(other)[0]
    assert len(alone["boxes"]) and torch.allclose(batched[0]["boxes"], alone["boxes"], atol=1e-5)
    assert torch.allclose(batched[1]["boxes"], after, atol=1e-5)
    upn.save_pretrained(tmp_path)
    again = UpnModel.from_pretrained(tmp_path)
    assert torch.allclose(again.propose(x)[0]["boxes"], after)
    with pytest.raises(ValueError, match="box refinement"):
        UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16)).refine_deltas(
            out["features"], x, torch.zeros(1, 5)
        )
    with pytest.raises(ValueError, match="refine_context"):
        UpnConfig(refine_context=0.5)


def test_position_embedding():
    e = box_position_embedding(torch.tensor([[0.1, 0.2, 0.5, 0.9]]), 32)
    assert e.shape == (1, 32) and torch.isfinite(e).all()
    with pytest.raises(ValueError):
        box_position_embedding(torch.zeros(1, 4), 30)


def test_processor_layouts_and_index_sets(world_tokenizer, micro_config):
    proc = PerceiverProcessor(world_tokenizer, micro_config)
    ids = proc.prompt_ids("please detect circle", 3)
    toks = world_tokenizer.convert_ids_to_tokens(ids)
    assert toks[: micro_config.image_grid**2] == ["<image>"] * micro_config.image_grid**2
    # fused box tokens: one <roi> per box, after the question
    assert toks.index("<|user|>") < toks.index("<roi>") and toks[-1] == "<|assistant|>"
    assert toks.count("<roi>") == 3 and "<obj0>" not in toks
    paper = PerceiverProcessor(
        world_tokenizer, PerceiverConfig(**{**micro_config.to_dict(), "layout": "paper", "box_tokens": "pair"})
    )
    ptoks = world_tokenizer.convert_ids_to_tokens(paper.prompt_ids("please detect circle", 3))
    assert ptoks.index("<obj0>") < ptoks.index("<|user|>")
    assert ptoks[ptoks.index("<obj0>") : ptoks.index("<obj0>") + 4] == ["<obj0>", "<roi>", "<obj1>", "<roi>"]
    assert proc.prompt_ids("what is <obj2>", 3)
    with pytest.raises(ValueError, match="names <obj3>, but there are 3 boxes"):
        proc.prompt_ids("what is <obj3>", 3)

    answer = "<ground>circle</ground><objects><obj1><obj3></objects>\n<ground>star</ground><objects>None</objects>"
    ex = proc.example("please detect circle; star", 4, answer, [[1, 3], []], random.Random(0))
    labels = [t for t in ex["labels"] if t != IGNORE]
    text = detokenize(world_tokenizer.convert_ids_to_tokens(labels))
    parsed = chatrex.parse(text, 4)
    assert [(g.phrase, sorted(g.indices)) for g in parsed.groups] == [("circle", [1, 3]), ("star", [])]
    (p1, s1), (p2, s2) = ex["index_sets"]
    assert s1 == [1, 3] and len(s2) == 1 and s2[0] in (1, 3) and p2 == p1 + 1  # the second index: what remains
    assert ex["group_members"] == [[1, 3], []] and len(ex["group_positions"]) == 2
    # where constrained decoding chooses: both indices and </objects> of the first block (the stop of its
    # first step is "None"), "None" of the second, not the </objects> that must follow "None"
    none, close = proc.none_id, proc.objects_close
    first = proc.obj_index[ex["labels"][p1]]
    assert ex["choices"] == [(p1, [], none), (p2, [first], close), (p2 + 1, [first, 4 - first], close),
                             (ex["group_positions"][1] + 1, [], none)]  # fmt: skip


def test_the_grammar_softmax_normalises_index_steps_over_what_decoding_can_choose(world_tokenizer, micro_config):
    """With ``index_softmax="grammar"`` the answer loss equals one computed by hand, where the decoding
    grammar itself, run over each answer, says which tokens each step could choose from."""
    model = _model(micro_config, index_softmax="grammar")
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=2, task_weights={"detect": 1.0, "refer": 1.0}).batch(list(range(6)))
    out = model(**batch)
    masks = GrammarMasks(world_tokenizer, out.logits.shape[-1])
    obj = model.config.obj_token_ids
    total, count, constrained = torch.zeros(()), 0, 0
    for i in range(len(batch["input_ids"])):
        state, used = "text", set()
        n = int(batch["box_mask"][i].sum())
        for p in torch.nonzero(batch["labels"][i] != IGNORE)[:, 0].tolist():
            token, row = int(batch["labels"][i, p]), out.logits[i, p - 1]
            if state in ("first", "indices"):
                row = row.masked_fill(~masks.allowed(state, n, used), float("-inf"))
                constrained += 1
            logp = row.log_softmax(-1)
            members = torch.nonzero(batch["index_sets"][i, p])[:, 0]
            total -= logp[[obj[k] for k in members]].logsumexp(-1) if len(members) else logp[token]
            count += 1
            state = masks.advance(state, token, used)
    assert constrained > 10
    assert torch.allclose(out.losses["lm"], total / count, atol=1e-5)
    vocabulary = _model(micro_config, index_softmax="vocabulary")
    assert vocabulary(**batch).losses["lm"] > out.losses["lm"]  # the same weights, fewer rivals


@pytest.mark.parametrize("near_duplicates", [False, True])
def test_training_boxes_stand_proposals_for_objects_and_keep_duplicates_only_when_asked(
    world_tokenizer, micro_config, near_duplicates
):
    proc = PerceiverProcessor(world_tokenizer, micro_config)
    data = WorldTasks(proc, WORLD, seed=1, near_duplicates=near_duplicates)
    scene = data.scene(0)
    gt = np.array([o.box for o in scene.objects], dtype=np.float32)
    iou = box_iou(torch.from_numpy(gt), torch.from_numpy(gt)).numpy() - np.eye(len(gt))
    alone = int(iou.max(axis=1).argmin())  # an object that no other object's box resembles
    assert iou[alone].max() < 0.3
    x0, y0, x1, y1 = gt[alone]
    pad = 0.05 * (x1 - x0)
    covering = [x0 + 1, y0, x1, y1]
    duplicate = [x0 - pad, y0 - pad, x1 + pad, y1 + pad]  # IoU >= 0.5, but the other one fits better
    nothing = [0, 0, 2, 2]
    proposals = np.array([duplicate, nothing, covering], dtype=np.float32)
    boxes, ids = data.boxes_for(scene, random.Random(0), proposals)
    assert sorted(i for i in ids if i is not None) == sorted(o.id for o in scene.objects)  # each object once
    assert np.allclose(boxes[ids.index(scene.objects[alone].id)], covering)
    assert len(boxes) == len(gt) + (2 if near_duplicates else 1) and ids.count(None) == len(boxes) - len(gt)
    distractors = {tuple(b) for b, i in zip(boxes.tolist(), ids, strict=True) if i is None}
    assert tuple(np.float32(nothing).tolist()) in distractors
    assert (tuple(np.float32(duplicate).tolist()) in distractors) == near_duplicates


def test_refer_weights_draw_a_kind_of_expression_more_often(world_tokenizer, micro_config):
    proc = PerceiverProcessor(world_tokenizer, micro_config)

    def kinds(refer_weights):
        data = WorldTasks(proc, WORLD, seed=3, refer_weights=refer_weights)
        drawn = [k for i in range(300) for k in data.item(i, task="refer").qa.meta["sub_domains"]]
        return drawn.count("negation") / len(drawn)

    uniform, weighted = kinds(None), kinds({"reasoning/negation": 4.0, "property/attribute": 0.5})
    assert weighted > 1.5 * uniform > 0
    with pytest.raises(ValueError, match="unknown expression kinds"):
        WorldTasks(proc, WORLD, refer_weights={"position/leftmost": 2.0})
    with pytest.raises(ValueError, match="positive"):
        WorldTasks(proc, WORLD, refer_weights={"position/extreme": 0.0})


@pytest.mark.parametrize("most", [1, 6])
def test_refer_expressions_bounds_the_expressions_of_a_query(world_tokenizer, micro_config, most):
    data = WorldTasks(PerceiverProcessor(world_tokenizer, micro_config), WORLD, seed=3, refer_expressions=most)
    sizes = [len(data.item(i, task="refer").qa.phrases) for i in range(60)]
    assert max(sizes) == most and min(sizes) == 1
    with pytest.raises(ValueError, match="at least 1"):
        WorldTasks(PerceiverProcessor(world_tokenizer, micro_config), WORLD, refer_expressions=0)


def test_questions_per_scene_ask_several_questions_of_one_scene_and_its_boxes(world_tokenizer, micro_config):
    proc = PerceiverProcessor(world_tokenizer, micro_config)
    shared = WorldTasks(proc, WORLD, seed=3, questions_per_scene=3)
    batch, items = shared.batch(list(range(6)))
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1] and batch["pixel_low"].shape[0] == 2
    assert items[0].scene.seed == items[2].scene.seed != items[3].scene.seed
    assert all(np.array_equal(items[0].boxes, it.boxes) and items[0].box_objects == it.box_objects for it in items[:3])
    assert len({it.qa.question for it in items[:3]}) == 3  # a question each, drawn apart
    # one question a scene is the stream as it was: item i asks about scene i, and no image_index
    single = WorldTasks(proc, WORLD, seed=3)
    batch1, items1 = single.batch([0, 1])
    assert "image_index" not in batch1 and batch1["pixel_low"].shape[0] == 2
    assert items1[1].scene.seed == items[3].scene.seed  # scene 1 either way
    assert items1[0].qa.question == items[0].qa.question  # the first question on a scene is the same draw
    with pytest.raises(ValueError, match="at least 1"):
        WorldTasks(proc, WORLD, questions_per_scene=0)


def test_prompts_sharing_an_image_encode_it_once_with_the_same_result(world_tokenizer, micro_config):
    """``image_index`` gives the losses and gradients of the same batch with each image repeated."""
    model = _model(micro_config)
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1, questions_per_scene=2).batch([0, 1, 2, 3])
    index = batch.pop("image_index")
    shared = model(**batch, image_index=index)
    shared.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    repeated = model(**{**batch, **{k: batch[k][index] for k in ("pixel_low", "pixel_high", "rgb_high")}})
    repeated.loss.backward()
    assert torch.allclose(shared.loss, repeated.loss, atol=1e-6)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="each of the 4 prompts"):
        model(**batch, image_index=torch.tensor([0, 0, 1, 2]))
    with pytest.raises(ValueError, match="no prompt reads"):
        model(**batch, image_index=torch.tensor([0, 0, 0, 0]))
    with pytest.raises(ValueError, match="same order"):
        model(**batch, image_index=torch.tensor([0, 1, 0, 1]))  # prompts of two scenes on one image


def test_image_frame_round_trip():
    f = ImageFrame(200, 100)
    boxes = np.array([[10, 20, 150, 90]])
    assert np.allclose(f.to_pixels(f.normalize(boxes)), boxes)


@pytest.mark.parametrize("index_head", ["pointer", "vocab"])
def test_forward_backward_save_load_parity(tmp_path, world_tokenizer, micro_config, index_head):
    model = _model(micro_config, index_head=index_head)
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1, 2])
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    assert set(out.losses) == {"lm", "match", "attributes"}
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("language_model.model.layers"))
    model.save_pretrained(tmp_path)
    again = PerceiverForRetrieval.from_pretrained(tmp_path)
    model.eval(), again.eval()
    with torch.no_grad():
        a, b = model(**batch).logits, again(**batch).logits
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)])
    # indices beyond the boxes are impossible
    k = batch["box_mask"].sum(1)
    obj = torch.tensor(model.config.obj_token_ids)
    assert torch.isinf(a[0, :, obj[int(k[0]) :]]).all()


@pytest.mark.parametrize("box_tokens, index_token_features", [("fused", True), ("pair", False), ("pair", True)])
def test_object_tokens_enter_where_the_config_says(world_tokenizer, micro_config, box_tokens, index_token_features):
    model = _model(micro_config, box_tokens=box_tokens, index_token_features=index_token_features).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0])
    ids = proc.prompt_ids("what is <obj2>", int(batch["box_mask"].sum()))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        emb = model.embed(input_ids, visual["image_tokens"], visual["object_tokens"], batch["box_mask"])
    table = model.language_model.get_input_embeddings().weight
    obj = visual["object_tokens"][0]
    index_of = {t: k for k, t in enumerate(model.config.obj_token_ids)}
    question_obj2 = ids.index(model.config.obj_token_ids[2])
    want = table[ids[question_obj2]] + (obj[2] if index_token_features else 0)
    assert torch.allclose(emb[0, question_obj2], want, atol=1e-6)
    rois = [p for p, t in enumerate(ids) if t == model.config.roi_token_id]
    for k, p in enumerate(rois):  # the k-th <roi>: object k, plus <objK>'s embedding when fused
        want = obj[k] + (table[model.config.obj_token_ids[k]] if box_tokens == "fused" else 0)
        assert torch.allclose(emb[0, p], want, atol=1e-6)
        if box_tokens == "pair":  # the pair's <objK> before it carries object k only with index features
            assert index_of[ids[p - 1]] == k
            want = table[ids[p - 1]] + (obj[k] if index_token_features else 0)
            assert torch.allclose(emb[0, p - 1], want, atol=1e-6)


def test_object_tokens_carry_the_attribute_heads_reading(world_tokenizer, micro_config):
    model = _model(micro_config, attribute_embedding=True).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    assert not mask.all()  # the two scenes' box counts differ: one is padded
    # built at the scale trained object tokens reach (norm ~sqrt(hidden)), not at the usual 0.02
    hidden = model.config.text().hidden_size
    column_norms = model.attribute_embedding.weight.detach().norm(dim=0)
    assert 0.7 * hidden**0.5 < float(column_norms.mean()) < 1.3 * hidden**0.5

    def tokens():
        v = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        return v["object_features"], v["object_tokens"]

    with torch.no_grad():
        feats, before = tokens()
        plain = model.object_projector(feats)
        assert torch.equal(before[~mask], plain[~mask])  # padding carries nothing
        # the category head made sure of class 3: each real box's token moves by that column less its old reading
        n = ATTRIBUTES["category"]
        old = model.attribute_heads["category"](feats).softmax(-1)
        model.attribute_heads["category"].bias[3] = 1e4
        _, after = tokens()
        category_columns = model.attribute_embedding.weight[:, :n]  # the category block comes first
        sure = torch.nn.functional.one_hot(torch.tensor(3), n).float()
        want = before + ((sure - old) @ category_columns.T) * mask[..., None]
        assert torch.allclose(after, want, atol=1e-4) and not torch.allclose(after[mask], before[mask], atol=1e-3)
    # the reading is given as is: the answer's loss reaches the embedding, not the heads that read
    model.train()
    out = model(**{**batch, "attribute_labels": None})
    out.loss.backward()
    assert model.attribute_embedding.weight.grad is not None and model.attribute_embedding.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.attribute_heads.parameters())


def test_holding_targets_and_heads(world_tokenizer, micro_config):
    """A person's box is taught what it holds (none or the item, and the item's colour); every other box
    holds nothing; a box of no object is unknown throughout."""
    scene = next(s for s in (generate_scene(seed, WORLD) for seed in range(50)) if s.of_kind("item"))
    item = scene.of_kind("item")[0]
    holder = scene.get(item.held_by)
    free = [p for p in scene.of_kind("person") if p.holding is None]
    assert attribute_targets(scene, holder.id)[4:] == [1 + ITEMS.index(item.category), list(COLORS).index(item.color)]
    assert attribute_targets(scene, item.id)[4:] == [0, -100]
    assert all(attribute_targets(scene, p.id)[4:] == [0, -100] for p in free)
    assert attribute_targets(scene, None) == [-100] * ATTRIBUTE_TARGETS

    with_heads = _model(micro_config, holding_attributes=True, attribute_embedding=True)
    assert list(with_heads.attribute_heads) == [*ATTRIBUTES, *HOLDING_ATTRIBUTES]
    assert with_heads.attribute_embedding.in_features == sum(ATTRIBUTES.values()) + sum(HOLDING_ATTRIBUTES.values())
    proc = PerceiverProcessor(world_tokenizer, with_heads.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1, 2, 3])
    assert batch["attribute_labels"].shape[-1] == ATTRIBUTE_TARGETS
    out = with_heads(**batch)
    assert torch.isfinite(out.losses["attributes"])
    # they learn from the RoI grid without moving it: the object encoder keeps its capacity for categories
    visual = with_heads.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
    n_base = sum(ATTRIBUTES.values())
    held = visual["attribute_logits"][..., n_base : n_base + HOLDING_ATTRIBUTES["held_item"]]
    target = batch["attribute_labels"][..., 4]
    torch.nn.functional.cross_entropy(held[target >= 0], target[target >= 0]).backward()
    assert with_heads.attribute_heads["held_item"].weight.grad.abs().sum() > 0
    encoder = [with_heads.roi_proj.weight, *with_heads.convnext.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in encoder)
    # a model built without them reads the first four columns of the same batch
    without = _model(micro_config)
    assert list(without.attribute_heads) == list(ATTRIBUTES)
    assert torch.isfinite(without(**batch).losses["attributes"])


def _reloaded(model, batch, tmp_path):
    """The config of ``model`` saved and loaded again, after checking that the two give the same logits."""
    model.save_pretrained(tmp_path)
    again = PerceiverForRetrieval.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        a, b = model(**batch).logits, again(**batch).logits
    assert torch.allclose(a[~torch.isinf(a)], b[~torch.isinf(b)])
    return again.config


def _object_tokens(model, batch, boxes=None):
    inputs = [batch[k] for k in ("pixel_low", "pixel_high", "rgb_high")]
    return model.encode_visual(*inputs, batch["boxes"] if boxes is None else boxes, batch["box_mask"])["object_tokens"]


def _object_tokens_with_and_without(model, batch, option, off_value=False):
    """The object tokens with the config's ``option`` as built, and set to ``off_value`` for one encoding."""
    on_value = getattr(model.config, option)
    with torch.no_grad():
        on = _object_tokens(model, batch)
        setattr(model.config, option, off_value)
        off = _object_tokens(model, batch)
        setattr(model.config, option, on_value)
    return on, off


def test_object_tokens_carry_their_box_coordinates(world_tokenizer, micro_config):
    assert torch.allclose(box_coordinates(torch.tensor([0.0, 0.0, 1.0, 1.0])), torch.tensor([0.0, 0.0, 2.0, 2.0]))
    assert torch.allclose(box_coordinates(torch.tensor([0.25, 0.5, 0.75, 1.0])), torch.tensor([0.0, 0.5, 1.0, 1.0]))
    model = _model(micro_config, coordinate_embedding=True).eval()
    # at the tokens' scale, like the attribute embedding: one box's move across the image is heard
    hidden = model.config.text().hidden_size
    assert 0.7 * hidden**0.5 < float(model.coordinate_embedding.weight.detach().norm(dim=0).mean()) < 1.3 * hidden**0.5
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    assert not mask.all()
    with_coordinates, without = _object_tokens_with_and_without(model, batch, "coordinate_embedding")
    with torch.no_grad():
        want = model.coordinate_embedding(box_coordinates(batch["boxes"]))
    assert torch.allclose((with_coordinates - without)[mask], want[mask], atol=1e-4)
    assert torch.equal(with_coordinates[~mask], without[~mask])  # padding carries nothing
    model.train()
    model(**batch).loss.backward()
    assert model.coordinate_embedding.weight.grad.abs().sum() > 0


def test_object_tokens_carry_where_their_box_stands_among_alike_boxes(tmp_path, world_tokenizer, micro_config):
    model = _model(micro_config, order_embedding="object_tokens").eval()
    hidden = model.config.text().hidden_size
    assert 0.7 * hidden**0.5 < float(model.order_embedding.weight.detach().norm(dim=0).mean()) < 1.3 * hidden**0.5
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    tokens, without = _object_tokens_with_and_without(model, batch, "order_embedding", "none")
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        probs = visual["attribute_logits"].split(list(model.config.attribute_classes().values()), dim=-1)
        want = model.order_embedding(order_features(batch["boxes"], mask, probs[0].softmax(-1), probs[1].softmax(-1)))
        # another box moving across the image changes where the first box stands, and so its token
        moved = batch["boxes"].clone()
        moved[:, 1] = (moved[:, 1] + torch.where(moved[:, 1, :1] < 0.5, 0.45, -0.45)).clamp(0, 1)
        after = _object_tokens(model, batch, moved)
    assert torch.allclose((tokens - without)[mask], want[mask], atol=1e-4)
    assert torch.equal(tokens[~mask], without[~mask])  # padding carries nothing
    assert not torch.allclose(after[:, 0], tokens[:, 0], atol=1e-3)
    model.train()
    model(**batch).loss.backward()
    assert model.order_embedding.weight.grad.abs().sum() > 0
    assert _reloaded(model, batch, tmp_path).order_embedding == "object_tokens"


def test_pointer_keys_carry_where_each_box_stands_among_alike_boxes(tmp_path, world_tokenizer, micro_config):
    plain = _model(micro_config)
    model = _model(micro_config, order_embedding="pointer_keys")
    # built as the plain model is, the counts' projection at zero: training starts where it would without them
    state = model.state_dict()
    assert {k: v for k, v in state.items() if not k.startswith("order_key.")}.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert not model.order_key.weight.any()
    _as_if_trained(model).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    assert not mask.all()
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        probs = visual["attribute_logits"].split(list(model.config.attribute_classes().values()), dim=-1)
        order = order_features(batch["boxes"], mask, probs[0].softmax(-1), probs[1].softmax(-1))
        keys = model(**batch, visual=visual).pointer_keys
        model.config.order_embedding = "none"
        without = model(**batch, visual=visual).pointer_keys
        model.config.order_embedding = "pointer_keys"
    assert torch.allclose(visual["object_order"], order)
    # the keys gain exactly the counts' projection; the object tokens, and so the language model, do not
    assert torch.allclose((keys - without)[mask], model.order_key(order)[mask], atol=1e-4)
    assert torch.equal(keys[~mask], without[~mask])
    assert torch.equal(visual["object_tokens"], _object_tokens(plain.eval(), batch))
    _check_the_order_layer(model, model.order_key, batch, visual, tmp_path)


def test_a_pointer_reading_weighs_each_boxs_order_counts_by_what_the_query_asks(
    tmp_path, world_tokenizer, micro_config
):
    plain = _model(micro_config, anchor_pointer=True).eval()
    model = _model(micro_config, anchor_pointer=True, order_embedding="pointer_reading").eval()
    # built as the plain model is (the anchor pointer too), the reading at zero
    state = model.state_dict()
    assert {k.split(".")[0] for k in set(state) - set(plain.state_dict())} == {"order_reading"}
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=3, task_weights={"refer": 1.0}).batch([0, 1])
    mask = batch["box_mask"]
    assert not mask.all()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
        _as_if_trained(model)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("order_reading.")})
        inputs = [batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")]
        visual = model.encode_visual(*inputs)
        out = model(**batch, visual=visual)
        hidden = _hidden_states(model, batch, visual)
        base = plain(**batch, visual=visual).logits
    probs = visual["attribute_logits"].split(list(model.config.attribute_classes().values()), dim=-1)
    order = order_features(batch["boxes"], mask, probs[0].softmax(-1), probs[1].softmax(-1))
    assert torch.allclose(out.pointer_inputs["object_order"], order)
    # each present box's index logit gains exactly its counts dotted with the query's reading
    want = torch.einsum("bkf,btf->btk", order, model.order_reading(hidden))
    obj = torch.tensor(model.config.obj_token_ids)[: mask.shape[1]]
    gained = out.logits[..., obj] - base[..., obj]
    present = mask[:, None, :].expand_as(gained)
    assert torch.allclose(gained[present], want[present], atol=1e-3)
    assert want.abs().max() > 0.1  # so the check above is not of zeros
    assert torch.isinf(out.logits[..., obj][~present]).all()
    # the language model reads the object tokens it read without the counts
    assert torch.equal(visual["object_tokens"], plain.encode_visual(*inputs)["object_tokens"])
    with pytest.raises(ValueError, match="pointer_reading"):
        PerceiverConfig(order_embedding="pointer_reading", index_head="vocab")
    _check_the_order_layer(model, model.order_reading, batch, visual, tmp_path)


def _hidden_states(model, batch, visual):
    """The language model's last hidden states over ``batch``'s prompts and answers, from ``visual``."""
    embeds = model.embed(batch["input_ids"], visual["image_tokens"], visual["object_tokens"], batch["box_mask"])
    return model.language_model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state


def _check_the_order_layer(model, layer, batch, visual, tmp_path):
    """Shared by the pointer's order options: a clear error without the order features, gradients
    reaching ``layer``, and save/load at parity."""
    with pytest.raises(ValueError, match="object_order"):
        model(**batch, visual={k: v for k, v in visual.items() if k != "object_order"})
    model.train()
    model(**batch).loss.backward()
    assert layer.weight.grad.abs().sum() > 0
    assert _reloaded(model, batch, tmp_path).order_embedding == model.config.order_embedding


def test_the_anchor_pointer_adds_the_geometry_to_an_anchor_to_the_pointers_scores(
    tmp_path, world_tokenizer, micro_config
):
    plain = _model(micro_config).eval()
    model = _model(micro_config, anchor_pointer=True).eval()
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    assert {k.split(".")[0] for k in set(state) - set(plain.state_dict())} == {"anchor_pointer"}
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=2, task_weights={"refer": 1.0}).batch([0, 1])
    with torch.no_grad():  # its reading starts at zero: the scores are the plain pointer's
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
        _as_if_trained(model)
        out = model(**batch)
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
    category = visual["attribute_logits"][..., : ATTRIBUTES["category"]].softmax(-1)
    assert torch.allclose(visual["object_category"], category)
    b, k = batch["box_mask"].shape
    assert out.pointer_inputs["anchor_geometry"].shape == (b, k, k, ANCHOR_GEOMETRY)
    assert not torch.allclose(out.logits, plain(**batch).logits)
    with pytest.raises(ValueError, match="object_category"):
        model(**batch, visual={k: v for k, v in visual.items() if k != "object_category"})
    with pytest.raises(ValueError, match="anchor_pointer"):
        PerceiverConfig(anchor_pointer=True, index_head="vocab")
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.anchor_pointer.parameters())
    assert _reloaded(model, batch, tmp_path).anchor_pointer


def test_order_targets_name_the_order_feature_an_expression_asks_for():
    red_circle = {"kind": "shape", "noun": "circle", "color": "red"}
    # (grouping, direction, rank) -> column of order_features: category_and_color, left, second
    assert order_target({"form": "ordinal", "k": 2, "direction": "left", "np": red_circle}) == 21
    assert order_target({"form": "extreme", "direction": "bottom", "np": {"kind": "person"}}) == 15
    assert order_target({"form": "extreme", "direction": "top", "np": {"kind": "person", "shirt": "red"}}) == 30
    assert order_target({"form": "np", "np": red_circle}) == -1
    # no grouping counts "red objects" or "small circles"
    assert order_target({"form": "extreme", "direction": "left", "np": {"kind": "shape", "color": "red"}}) == -1
    small = {"kind": "shape", "noun": "circle", "size": "small"}
    assert order_target({"form": "extreme", "direction": "left", "np": small}) == -1


def test_pointer_targets_give_each_group_its_anchor_and_the_order_feature_only_its_answer_has(
    world_tokenizer, micro_config
):
    """Against the world's own programs: a group's anchor boxes are the objects its expression's anchor
    selects, and counted from the true categories and colours, the expression's order feature is set on
    its answer's box and on no other box its noun phrase matches."""
    proc = PerceiverProcessor(world_tokenizer, micro_config)
    data = WorldTasks(proc, WorldConfig(size=128, person_share=0.35, relation_depth=2), seed=5,
                      task_weights={"refer": 1.0})  # fmt: skip
    anchored = ordered = 0
    for start in range(0, 48, 4):
        batch, items = data.batch(list(range(start, start + 4)))
        assert batch["group_anchors"].shape == batch["group_members"].shape
        for i, it in enumerate(items):
            programs = it.qa.meta["programs"]
            assert batch["group_members"][i, : len(programs)].tolist() == [
                [k in g for k in range(batch["boxes"].shape[1])] for g in it.qa.groups
            ]
            labels = torch.tensor(it.attributes)[None]  # true (category, colour, ...) of each box
            onehot = [F.one_hot(labels[..., c].clamp(min=0), n) * (labels[..., c:c + 1] >= 0) for c, n in
                      enumerate(ATTRIBUTES.values())][:2]  # fmt: skip
            boxes = torch.from_numpy(it.boxes)[None]
            counts = order_features(boxes, torch.ones(1, len(it.boxes), dtype=torch.bool), *(o.float() for o in onehot))
            for g, program in enumerate(programs):
                anchors = torch.nonzero(batch["group_anchors"][i, g])[:, 0].tolist()
                if "anchor" in program:
                    want = set(evaluate(it.scene, program["anchor"]))
                    assert anchors and {it.box_objects[k] for k in anchors} == want
                    anchored += 1
                else:
                    assert anchors == []
                target = int(batch["group_order"][i, g])
                assert target == order_target(program)
                if target >= 0:
                    matches = [k for k, o in enumerate(it.box_objects)
                               if o is not None and NounPhrase(**program["np"]).matches(it.scene.get(o))]  # fmt: skip
                    has = [k for k in matches if counts[0, k, target] > 0.99]
                    assert has == it.qa.groups[g] and len(matches) > 1
                    ordered += 1
    assert anchored >= 5 and ordered >= 5  # so the checks above ran


def test_the_anchor_and_order_losses_teach_the_pointers_additions(world_tokenizer, micro_config):
    with pytest.raises(ValueError, match="needs anchor_pointer"):
        PerceiverConfig(anchor_loss_weight=0.5)
    with pytest.raises(ValueError, match="pointer_reading"):
        PerceiverConfig(order_loss_weight=0.5, anchor_pointer=True)
    options = {"anchor_pointer": True, "order_embedding": "pointer_reading"}
    proc = PerceiverProcessor(world_tokenizer, micro_config)
    data = WorldTasks(proc, WorldConfig(size=128, person_share=0.35, relation_depth=2), seed=5,
                      task_weights={"refer": 1.0})  # fmt: skip
    batch, _ = data.batch([1, 8, 9, 18, 22, 28])  # expressions with anchors and with ranks among them
    positions, anchors, targets = batch["group_positions"], batch["group_anchors"], batch["group_order"]
    assert anchors.any(-1).sum() >= 2 and (targets >= 0).sum() >= 2
    plain = _model(micro_config, **options)(**batch)
    assert "anchor" not in plain.losses and "order" not in plain.losses  # off unless asked for
    model = _model(micro_config, **options, anchor_loss_weight=0.5, order_loss_weight=0.25)
    out = model(**batch)
    assert torch.equal(out.logits, plain.logits)  # losses only: the answer is the same
    weights = {"match": 1.0, "attributes": 0.5, "anchor": 0.5, "order": 0.25}
    total = out.losses["lm"] + sum(w * out.losses[name] for name, w in weights.items())
    assert torch.allclose(out.loss, total)
    # by hand: at each group's <objects> token, the anchor's softmax against its boxes, the reading's
    # against the order feature
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        hidden = _hidden_states(model, batch, visual)
        keys = out.pointer_inputs["anchor_keys"]
    anchor_terms, order_terms = [], []
    for i, g in torch.nonzero(positions >= 0).tolist():
        h = hidden[i, positions[i, g]]
        if anchors[i, g].any():
            logits = (model.anchor_pointer.query(h) @ keys[i].T / math.sqrt(h.shape[-1]))[batch["box_mask"][i]]
            logp = logits.log_softmax(-1)[anchors[i, g][batch["box_mask"][i]]]
            anchor_terms.append(-logp.logsumexp(-1))
        if targets[i, g] >= 0:
            order_terms.append(-model.order_reading(h).log_softmax(-1)[targets[i, g]])
    assert torch.allclose(out.losses["anchor"], torch.stack(anchor_terms).mean(), atol=1e-4)
    assert torch.allclose(out.losses["order"], torch.stack(order_terms).mean(), atol=1e-4)
    # they learn: a few steps on them alone (over the visual tokens as they are, to be quick)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        losses = model(**batch, visual=visual).losses
        loss = losses["anchor"] + losses["order"]
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.5 * first
    # a batch without such expressions adds nothing
    detect, _ = WorldTasks(proc, WORLD, seed=6, task_weights={"detect": 1.0}).batch([0, 1])
    out = model(**detect)
    assert float(out.losses["anchor"]) == float(out.losses["order"]) == 0.0


@pytest.mark.parametrize(
    "options",
    [{"order_embedding": "pointer_keys"}, {"anchor_pointer": True},
     {"order_embedding": "pointer_reading", "anchor_pointer": True}],
)  # fmt: skip
def test_answers_in_a_batch_read_each_images_own_objects(world_tokenizer, micro_config, options):
    """``Perceiver.answer`` pads every per-object input, those of the pointer's additions too, to the
    batch's box count: an image answered beside another with more boxes gets the answer it gets alone."""
    model = _as_if_trained(_model(micro_config, **options))
    upn = UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16))
    perceiver = Perceiver(model, upn, world_tokenizer)
    scenes = [generate_scene(s, WORLD) for s in (1, 2)]
    boxes = [np.array([o.box for o in sc.instances]) for sc in scenes]
    assert len(boxes[0]) != len(boxes[1])
    question = "Please detect circle; person in this image. Answer the question with object indexes."
    together = perceiver.ask_batch([sc.image for sc in scenes], [question] * 2, boxes)
    alone = [perceiver.ask(sc.image, question, b) for sc, b in zip(scenes, boxes, strict=True)]
    assert [a.text for a in together] == [a.text for a in alone]


@pytest.mark.parametrize("relation_layers", [0, 2])
def test_relation_layers_let_an_object_token_see_the_other_boxes(
    tmp_path, world_tokenizer, micro_config, relation_layers
):
    model = _model(micro_config, relation_layers=relation_layers).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    visual_inputs = [batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")]
    with torch.no_grad():
        tokens = model.encode_visual(*visual_inputs)["object_tokens"]
        moved = batch["boxes"].clone()
        moved[:, 0] = torch.tensor([0.0, 0.0, 0.3, 0.3])  # only the first box of each image moves
        visual_inputs[3] = moved
        after = model.encode_visual(*visual_inputs)["object_tokens"]
    others = batch["box_mask"].clone()
    others[:, 0] = False
    assert torch.allclose(after[others], tokens[others], atol=1e-5) == (relation_layers == 0)
    if not relation_layers:
        assert not hasattr(model, "object_relation")
        return
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.object_relation.parameters())
    assert _reloaded(model, batch, tmp_path).relation_layers == 2
    with pytest.raises(ValueError, match="relation_layers"):
        PerceiverConfig(relation_layers=-1)


def _as_if_trained(model):
    """The pointer's additions start at zero; give them weights so that a test can see them act."""
    with torch.no_grad():
        anchor = getattr(model, "anchor_pointer", None)
        for layer in (getattr(model, "order_key", None), getattr(model, "order_reading", None),
                      anchor.reading if anchor is not None else None):  # fmt: skip
            if layer is not None:
                layer.weight.normal_(std=3.0)
    return model


@pytest.mark.parametrize(
    "options",
    [{"box_tokens": "fused"}, {"box_tokens": "pair"}, {"prefix_attention": "bidirectional"},
     {"order_embedding": "pointer_keys", "anchor_pointer": True},
     {"order_embedding": "pointer_reading", "anchor_pointer": True}],
)  # fmt: skip
def test_cached_decoding_matches_a_full_forward(world_tokenizer, micro_config, options):
    """Each generated token's logits equal those of one forward pass over prompt + answer so far, so the
    KV-cached loop embeds generated <objK> tokens exactly as the training forward does (and, with a
    bidirectional prefix, attends as the training forward does; with the pointer's additions, scores as
    it does)."""
    model = _as_if_trained(_model(micro_config, **options)).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=4)
    it = data.item(0, task="detect")
    n = len(it.boxes)
    answer = world_tokenizer(f"<ground>x</ground><objects><obj{n - 1}><obj0></objects>", add_special_tokens=False)
    forced = answer["input_ids"]
    batch = proc.collate([proc.example(it.qa.question, n)], [it.boxes], pad_left=True)
    batch.update(proc.images([it.image])[0])
    steps = []  # the logits of each decoding step, recorded on their way out of the model
    logits_of = model._logits
    model._logits = lambda *a: steps.append(logits_of(*a)[:, -1]) or logits_of(*a)  # type: ignore[method-assign]
    (g,) = generate(model, batch, world_tokenizer, max_new_tokens=len(forced) + 1, forced=[forced], constrained=False)
    del model._logits
    assert g.token_ids == forced
    full = proc.collate([{"input_ids": proc.prompt_ids(it.qa.question, n) + forced}], [it.boxes])
    full.update(proc.images([it.image])[0])
    with torch.no_grad():
        want = model(**full).logits[0, -len(forced) - 1 : -1]  # the predictions of forced[0], forced[1], ...
    got = torch.cat(steps[: len(forced)])
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)) and torch.allclose(got[finite], want[finite], atol=1e-4)


@pytest.mark.parametrize("prefix_attention", ["causal", "bidirectional"])
def test_a_bidirectional_prefix_lets_each_box_see_the_boxes_after_it(world_tokenizer, micro_config, prefix_attention):
    """Moving the last box changes the first box's pointer key only when the prompt attends both ways,
    and left padding changes nothing either way."""
    model = _model(micro_config, prefix_attention=prefix_attention).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=2)
    its = [data.item(i, task="detect") for i in range(2)]
    answer = world_tokenizer("<ground>x</ground><objects><obj0></objects>", add_special_tokens=False)["input_ids"]

    def run(items, boxes):
        exs = [
            {"input_ids": proc.prompt_ids(it.qa.question, len(b)) + answer} for it, b in zip(items, boxes, strict=True)
        ]
        batch = proc.collate(exs, boxes, pad_left=True)
        batch.update(proc.images([it.image for it in items])[0])
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(**batch)
        return out.pointer_keys, out.logits

    boxes = [np.asarray(it.boxes, dtype=np.float32) for it in its]
    keys, _ = run(its[:1], boxes[:1])
    moved = boxes[0].copy()
    moved[-1] = [0.1, 0.1, 0.3, 0.3]
    keys_moved, _ = run(its[:1], [moved])
    first_box_changed = not torch.allclose(keys[0, 0], keys_moved[0, 0], atol=1e-6)
    assert first_box_changed == (prefix_attention == "bidirectional")
    assert not torch.allclose(keys[0, -1], keys_moved[0, -1])  # the moved box itself changes either way
    # two prompts of different lengths, left-padded together: each as it is alone
    both_keys, both_logits = run(its, boxes)
    assert len(set(len(b) for b in boxes)) == 2  # so one of them is padded
    for i in range(2):
        alone_keys, alone_logits = run(its[i : i + 1], boxes[i : i + 1])
        t, k = alone_logits.shape[1], alone_keys.shape[1]
        finite = torch.isfinite(alone_logits[0])
        assert torch.allclose(both_logits[i, -t:][finite], alone_logits[0][finite], atol=1e-4)
        assert torch.allclose(both_keys[i, :k], alone_keys[0], atol=1e-4)


def test_the_bidirectional_prefix_is_the_same_under_eager_and_sdpa_attention(world_tokenizer, micro_config):
    """Eager attention adds the mask to the scores, sdpa takes it as booleans: both must attend alike."""
    model = _model(micro_config, prefix_attention="bidirectional").eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=3).batch([0, 1])
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.language_model.set_attn_implementation("eager")
        assert model.language_model.config._attn_implementation == "eager"
        eager = model(**batch).logits
    finite = torch.isfinite(sdpa)
    assert torch.equal(finite, torch.isfinite(eager)) and torch.allclose(sdpa[finite], eager[finite], atol=1e-4)


def test_lists_go_on_while_the_indices_together_outweigh_stopping(world_tokenizer):
    masks = GrammarMasks(world_tokenizer, len(world_tokenizer))
    obj = masks.obj_ids
    probs = torch.zeros(len(world_tokenizer))
    probs[masks.objects_close], probs[obj[3]], probs[obj[5]], probs[obj[8]] = 0.31, 0.25, 0.24, 0.2
    # </objects> is the single likeliest token, but three remaining members hold 0.69 together
    assert _index_or_stop(probs, masks, masks.objects_close) == obj[3]
    probs[masks.objects_close], probs[obj[3]], probs[obj[5]], probs[obj[8]] = 0.55, 0.25, 0.15, 0.05
    assert _index_or_stop(probs, masks, masks.objects_close) == masks.objects_close
    first = torch.zeros(len(world_tokenizer))  # the first index: None is the stop
    first[masks.none], first[obj[0]], first[obj[1]] = 0.4, 0.35, 0.25
    assert _index_or_stop(first, masks, masks.none) == obj[0]
    first[masks.none], first[obj[0]], first[obj[1]] = 0.7, 0.2, 0.1
    assert _index_or_stop(first, masks, masks.none) == masks.none


def test_roi_placeholder_count_is_checked(world_tokenizer, micro_config):
    model = _model(micro_config)
    proc = PerceiverProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0])
    batch["box_mask"] = batch["box_mask"].clone()
    batch["box_mask"][0, 0] = False
    with pytest.raises(ValueError, match="placeholders"):
        model(**batch)


@pytest.mark.parametrize("index_head, budget", [("pointer", 40), ("vocab", 40), ("pointer", 7), ("vocab", 4)])
def test_constrained_decoding_is_always_well_formed(world_tokenizer, micro_config, index_head, budget):
    model = _model(micro_config, index_head=index_head).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=3)
    items = [data.item(i) for i in range(6)]
    batch = proc.collate([proc.example(it.qa.question, len(it.boxes)) for it in items], [it.boxes for it in items],
                         pad_left=True)  # fmt: skip
    batch.update(proc.images([it.image for it in items])[0])
    for g, it in zip(generate(model, batch, world_tokenizer, max_new_tokens=budget), items, strict=True):
        text = detokenize(world_tokenizer.convert_ids_to_tokens(g.token_ids))
        parsed = chatrex.parse(text, len(it.boxes))
        assert parsed.problems == (), (text, parsed.problems)
        assert len(g.token_ids) <= budget
        assert all(0 <= k < len(it.boxes) for k, _ in g.index_probs)
        assert all(0 < p <= 1 for _, p in g.index_probs)


def test_a_micro_model_learns(world_tokenizer, micro_config):
    """Region category captions of one box: loss must fall well below its start in 80 steps."""
    model = _model(micro_config)
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=4, task_weights={"region_category": 1.0})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(80):
        batch, _ = data.batch([step * 8 + j for j in range(8)])
        out = model(**batch)
        out.losses["lm"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.losses["lm"].item())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])


def test_the_shipped_checkpoint_is_the_tiny_config_and_fits_the_30_MB_cap():
    # a change to TINY that is not retrained and shipped would leave the default model another architecture
    shipped = PerceiverConfig.from_pretrained(DEFAULT_MODEL)
    for key, value in TINY.items():
        if isinstance(value, dict):
            # sub-configs are saved as dicts; the world tokenizer's size replaces vocab_size when a model is built
            saved = getattr(shipped, key)
            assert {k: saved.get(k) for k in value if k != "vocab_size"} == {
                k: v for k, v in value.items() if k != "vocab_size"
            }, key
        else:
            assert getattr(shipped, key) == value, key
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 30_000_000, f"checkpoints/tiny is {size / 1e6:.1f} MB"


def test_named_configs():
    assert named_config("tiny").layout == "question_first"
    real = named_config("chatrex-7b")
    assert real.text().hidden_size == 3584 and real.vision().image_size == 336 and real.high_resolution == 768
    with pytest.raises(ValueError, match="unknown config"):
        named_config("huge")
    with pytest.raises(ValueError, match="layout"):
        PerceiverConfig(layout="sideways")
    tiny = named_config("tiny")
    assert (tiny.box_tokens, tiny.index_token_features) == ("fused", True)
    assert (real.box_tokens, real.index_token_features) == ("pair", False)
    assert (tiny.roi_pooling, real.roi_pooling) == ("flatten", "mean")
    # a config.json saved before these options existed keeps meaning what it meant
    new_options = ("box_tokens", "index_token_features", "roi_pooling", "attribute_embedding", "holding_attributes",
                   "coordinate_embedding", "relation_layers", "order_embedding", "anchor_pointer")  # fmt: skip
    old = PerceiverConfig(**{k: v for k, v in tiny.to_dict().items() if k not in new_options})
    assert (old.box_tokens, old.index_token_features, old.roi_pooling) == ("pair", False, "mean")
    assert not (old.attribute_embedding or old.holding_attributes or old.coordinate_embedding or old.relation_layers)
    assert old.order_embedding == "none"
    assert tiny.attribute_embedding and tiny.holding_attributes
    assert not (tiny.coordinate_embedding or tiny.relation_layers) and tiny.order_embedding == "pointer_reading"
    assert tiny.anchor_pointer and not (real.anchor_pointer or old.anchor_pointer)
    # the tiny models train on CPU, where eager attention is the faster at their lengths; the 7B keeps the default
    assert tiny.text()._attn_implementation == tiny.vision()._attn_implementation == "eager"
    assert real.text()._attn_implementation != "eager"
    # saved before "pointer_keys", order_embedding was a flag
    assert [PerceiverConfig(order_embedding=v).order_embedding for v in (False, True)] == ["none", "object_tokens"]
    with pytest.raises(ValueError, match="order_embedding"):
        PerceiverConfig(order_embedding="everywhere")
    assert not (real.attribute_embedding or real.holding_attributes or real.coordinate_embedding)
    assert not real.relation_layers
    with pytest.raises(ValueError, match="box_tokens"):
        PerceiverConfig(box_tokens="triple")
    with pytest.raises(ValueError, match="roi_pooling"):
        PerceiverConfig(roi_pooling="max")
    assert (tiny.index_softmax, real.index_softmax, PerceiverConfig().index_softmax) == ("grammar", "vocabulary",
                                                                                        "vocabulary")  # fmt: skip
    with pytest.raises(ValueError, match="index_softmax"):
        PerceiverConfig(index_softmax="sparse")


@pytest.mark.parametrize("roi_pooling", ["mean", "flatten"])
def test_flattened_rois_keep_the_layout_that_the_mean_averages_away(micro_config, roi_pooling):
    model = _model(micro_config, roi_pooling=roi_pooling).eval()
    size = model.config.high_resolution
    channels = list(model.config.convnext().hidden_sizes or [])
    torch.manual_seed(1)
    levels = [torch.randn(1, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16), strict=True)]
    rgb = torch.rand(1, 3, size, size)
    box = torch.tensor([[[0.25, 0.3, 0.75, 0.6]]])  # centred left-right: a mirror maps it onto itself
    mask = torch.ones(1, 1, dtype=torch.bool)
    with torch.no_grad():
        encoded = model.encode_objects(levels, rgb, box, mask)
        feats, tokens = encoded["object_features"], encoded["object_tokens"]
        mirrored = model.encode_objects([lv.flip(-1) for lv in levels], rgb.flip(-1), box, mask)["object_features"]
    assert tokens.shape == (1, 1, model.config.text().hidden_size)
    if roi_pooling == "mean":  # the same cells in another order: the same mean
        assert torch.allclose(feats, mirrored, atol=1e-5)
    else:
        assert not torch.allclose(feats, mirrored, atol=1e-3)


def test_forced_phrases_give_the_asked_structure(world_tokenizer, micro_config):
    model = _model(micro_config).eval()
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=5)
    items = [data.item(i) for i in range(3)]
    asked = [["circle"], ["the red square", "person"], ["star", "cup", "flag"]]
    batch = proc.collate([proc.example("please detect", len(it.boxes)) for it in items], [it.boxes for it in items],
                         pad_left=True)  # fmt: skip
    batch.update(proc.images([it.image for it in items])[0])
    out = generate(model, batch, world_tokenizer, max_new_tokens=60, phrases=asked)
    for g, it, phrases in zip(out, items, asked, strict=True):
        parsed = chatrex.parse(detokenize(world_tokenizer.convert_ids_to_tokens(g.token_ids)), len(it.boxes))
        assert [grp.phrase for grp in parsed.groups] == phrases and parsed.problems == ()


@pytest.mark.parametrize(
    "options",
    [{}, {"order_embedding": "pointer_keys", "anchor_pointer": True},
     {"order_embedding": "pointer_reading", "anchor_pointer": True}],
)  # fmt: skip
def test_losses_stay_finite_without_groups_or_boxes(world_tokenizer, micro_config, options):
    """A batch with no <objects> group (and no boxes) must not log NaN: impossible indices are -inf."""
    model = _as_if_trained(_model(micro_config, **options))
    proc = PerceiverProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=6, task_weights={"detect": 1.0}, answer_format="coordinates")
    batch, _ = data.batch([0, 1])
    out = model(**batch)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.losses.values())
