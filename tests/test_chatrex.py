import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceive.boxes import box_iou
from perceive.data.sources.world import scene_record, world_schema
from perceive.formats import chatrex
from perceive.models.chatrex.anchor_pointer import ANCHOR_GEOMETRY
from perceive.models.chatrex.configuration_chatrex import TINY, ChatRexConfig, named_config
from perceive.models.chatrex.modeling_chatrex import (
    ChatRexForConditionalGeneration,
    box_coordinates,
)
from perceive.models.chatrex.object_order import order_features
from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.models.chatrex.processing_chatrex import IGNORE, ChatRexProcessor
from perceive.models.generation import generate
from perceive.models.grammar_chatrex import ChatRexGrammar
from perceive.models.upn.modeling_upn import UpnConfig, UpnModel
from perceive.perceiver import DEFAULT_MODEL
from perceive.tokenization import detokenize
from perceive.train.data import (
    WORLD_ATTRIBUTES,
    WORLD_ORDER_GROUPINGS,
    WorldTasks,
    order_target,
    world_model_options,
)
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import NounPhrase, describe, evaluate
from perceive.world.scene import COLORS, ITEMS

WORLD = WorldConfig(size=128, person_share=0.35, max_objects=5)


def _model(cfg, **kw):
    torch.manual_seed(0)
    c = ChatRexConfig(**{**cfg.to_dict(), **kw})
    return ChatRexForConditionalGeneration(c)


def _decode(model, batch, tokenizer, phrases=None, **options):
    """Greedy answers of ``model`` for a left-padded batch under the retrieval grammar."""
    grammar = ChatRexGrammar(tokenizer, model.config.text().vocab_size)
    samples = [{"num_boxes": int(n)} for n in batch["box_mask"].sum(dim=1).tolist()]
    plans = None if phrases is None else [grammar.plan(tokenizer, p) for p in phrases]
    return generate(model.begin_decoding(batch), grammar, samples, plans=plans, **options)


def _index_probs(generated, tokenizer) -> list[tuple[int, float]]:
    """(box index, probability) of each index chosen inside an objects block."""
    index = {tokenizer.convert_tokens_to_ids(f"<obj{k}>"): k for k in range(100)}
    return [(index[t], p) for t, p, c in zip(generated.token_ids, generated.probs, generated.in_choice, strict=True)
            if c and t in index]  # fmt: skip


def test_processor_layouts_and_index_sets(world_tokenizer, micro_config):
    proc = ChatRexProcessor(world_tokenizer, micro_config)
    ids = proc.prompt_ids("please detect circle", 3)
    toks = world_tokenizer.convert_ids_to_tokens(ids)
    assert toks[: micro_config.image_grid**2] == ["<image>"] * micro_config.image_grid**2
    # fused box tokens: one <roi> per box, after the question
    assert toks.index("<|user|>") < toks.index("<roi>") and toks[-1] == "<|assistant|>"
    assert toks.count("<roi>") == 3 and "<obj0>" not in toks
    paper = ChatRexProcessor(
        world_tokenizer, ChatRexConfig(**{**micro_config.to_dict(), "layout": "paper", "box_tokens": "pair"})
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=2, task_weights={"detect": 1.0, "refer": 1.0}).batch(list(range(6)))
    out = model(**batch)
    grammar = ChatRexGrammar(world_tokenizer, out.logits.shape[-1])
    obj = model.config.obj_token_ids
    total, count, constrained = torch.zeros(()), 0, 0
    for i in range(len(batch["input_ids"])):
        state = grammar.start(num_boxes=int(batch["box_mask"][i].sum()))
        for p in torch.nonzero(batch["labels"][i] != IGNORE)[:, 0].tolist():
            token, row = int(batch["labels"][i, p]), out.logits[i, p - 1]
            if state.name in ("first", "indices"):
                row = row.masked_fill(~grammar.allowed(state, 1000), float("-inf"))
                constrained += 1
            logp = row.log_softmax(-1)
            members = torch.nonzero(batch["index_sets"][i, p])[:, 0]
            total -= logp[[obj[k] for k in members]].logsumexp(-1) if len(members) else logp[token]
            count += 1
            state = grammar.advance(state, token)
    assert constrained > 10
    assert torch.allclose(out.losses["lm"], total / count, atol=1e-5)
    vocabulary = _model(micro_config, index_softmax="vocabulary")
    assert vocabulary(**batch).losses["lm"] > out.losses["lm"]  # the same weights, fewer rivals


@pytest.mark.parametrize("near_duplicates", [False, True])
def test_training_boxes_stand_proposals_for_objects_and_keep_duplicates_only_when_asked(
    world_tokenizer, micro_config, near_duplicates
):
    proc = ChatRexProcessor(world_tokenizer, micro_config)
    data = WorldTasks(proc, WORLD, seed=1, near_duplicates=near_duplicates)
    record = data.record(0)
    scene = record.origin
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
    boxes, ids = data.boxes_for(record, random.Random(0), proposals)
    assert sorted(i for i in ids if i is not None) == sorted(o.id for o in scene.objects)  # each object once
    assert np.allclose(boxes[ids.index(scene.objects[alone].id)], covering)
    assert len(boxes) == len(gt) + (2 if near_duplicates else 1) and ids.count(None) == len(boxes) - len(gt)
    distractors = {tuple(b) for b, i in zip(boxes.tolist(), ids, strict=True) if i is None}
    assert tuple(np.float32(nothing).tolist()) in distractors
    assert (tuple(np.float32(duplicate).tolist()) in distractors) == near_duplicates


def test_refer_weights_draw_a_kind_of_expression_more_often(world_tokenizer, micro_config):
    proc = ChatRexProcessor(world_tokenizer, micro_config)

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
    data = WorldTasks(ChatRexProcessor(world_tokenizer, micro_config), WORLD, seed=3, refer_expressions=most)
    sizes = [len(data.item(i, task="refer").qa.phrases) for i in range(60)]
    assert max(sizes) == most and min(sizes) == 1
    with pytest.raises(ValueError, match="at least 1"):
        WorldTasks(ChatRexProcessor(world_tokenizer, micro_config), WORLD, refer_expressions=0)


def test_questions_per_scene_ask_several_questions_of_one_scene_and_its_boxes(world_tokenizer, micro_config):
    proc = ChatRexProcessor(world_tokenizer, micro_config)
    shared = WorldTasks(proc, WORLD, seed=3, questions_per_scene=3)
    batch, items = shared.batch(list(range(6)))
    assert batch["image_index"].tolist() == [0, 0, 0, 1, 1, 1] and batch["pixel_low"].shape[0] == 2
    assert items[0].record.origin.seed == items[2].record.origin.seed != items[3].record.origin.seed
    assert all(np.array_equal(items[0].boxes, it.boxes) and items[0].box_objects == it.box_objects for it in items[:3])
    assert len({it.qa.question for it in items[:3]}) == 3  # a question each, drawn apart
    # one question a scene is the stream as it was: item i asks about scene i, and no image_index
    single = WorldTasks(proc, WORLD, seed=3)
    batch1, items1 = single.batch([0, 1])
    assert "image_index" not in batch1 and batch1["pixel_low"].shape[0] == 2
    assert items1[1].record.origin.seed == items[3].record.origin.seed  # scene 1 either way
    assert items1[0].qa.question == items[0].qa.question  # the first question on a scene is the same draw
    with pytest.raises(ValueError, match="at least 1"):
        WorldTasks(proc, WORLD, questions_per_scene=0)


def test_prompts_sharing_an_image_encode_it_once_with_the_same_result(world_tokenizer, micro_config):
    """``image_index`` gives the losses and gradients of the same batch with each image repeated."""
    model = _model(micro_config)
    proc = ChatRexProcessor(world_tokenizer, model.config)
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


@pytest.mark.parametrize("index_head", ["pointer", "vocab"])
def test_forward_backward_save_load_parity(tmp_path, world_tokenizer, micro_config, index_head):
    model = _model(micro_config, index_head=index_head)
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1, 2])
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    assert set(out.losses) == {"lm", "match", "attributes"}
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("language_model.model.layers"))
    model.save_pretrained(tmp_path)
    again = ChatRexForConditionalGeneration.from_pretrained(tmp_path)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
        n = model.config.attribute_heads["category"]
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
    holding = ["held_item", "held_item_color"]
    held = [1 + ITEMS.index(item.category), list(COLORS).index(item.color)]
    record, schema = scene_record(scene, describe(scene, WORLD)), world_schema()
    assert schema.labels(record.instance(holder.id), holding) == held
    assert schema.labels(record.instance(item.id), holding) == [0, -100]
    assert all(schema.labels(record.instance(p.id), holding) == [0, -100] for p in free)
    assert schema.labels(None, list(WORLD_ATTRIBUTES)) == [-100] * len(WORLD_ATTRIBUTES)

    with_heads = _model(micro_config, **world_model_options(), attribute_embedding=True)
    assert list(with_heads.attribute_heads) == list(WORLD_ATTRIBUTES)
    assert with_heads.config.grid_attribute_heads == holding
    assert with_heads.attribute_embedding.in_features == sum(WORLD_ATTRIBUTES.values())
    proc = ChatRexProcessor(world_tokenizer, with_heads.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1, 2, 3])
    assert batch["attribute_labels"].shape[-1] == len(WORLD_ATTRIBUTES)
    out = with_heads(**batch)
    assert torch.isfinite(out.losses["attributes"])
    # they learn from the RoI grid without moving it: the object encoder keeps its capacity for categories
    visual = with_heads.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
    n_base = sum(WORLD_ATTRIBUTES[k] for k in ("category", "color", "pattern", "size"))
    held = visual["attribute_logits"][..., n_base : n_base + WORLD_ATTRIBUTES["held_item"]]
    target = batch["attribute_labels"][..., 4]
    torch.nn.functional.cross_entropy(held[target >= 0], target[target >= 0]).backward()
    assert with_heads.attribute_heads["held_item"].weight.grad.abs().sum() > 0
    encoder = [with_heads.object_encoder.roi_proj.weight, *with_heads.vision.convnext.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in encoder)
    # a model built without them gets its own four columns from the same stream
    without = _model(micro_config)
    assert list(without.attribute_heads) == ["category", "color", "pattern", "size"]
    proc = ChatRexProcessor(world_tokenizer, without.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1, 2, 3])
    assert batch["attribute_labels"].shape[-1] == 4
    assert torch.isfinite(without(**batch).losses["attributes"])


def test_attribute_heads_come_from_the_data_and_are_checked(tmp_path, world_tokenizer, micro_config):
    """A configuration names its heads (the data's); what reads a head the data does not label is refused,
    and so is a stream asked for an attribute the world does not label."""
    with pytest.raises(ValueError, match="alike_head names"):
        _model(micro_config, attribute_heads={"color": 8}, anchor_pointer=True)
    with pytest.raises(ValueError, match="order_groupings names"):
        _model(micro_config, order_embedding="pointer_reading", order_groupings=[["category", "shirt"]])
    with pytest.raises(ValueError, match="grid_attribute_heads names"):
        _model(micro_config, grid_attribute_heads=["held_item"])
    coco_like = _model(micro_config, attribute_heads={"category": 80})
    assert coco_like.attribute_heads["category"].out_features == 80
    # the heads keep their order through config.json, which is written with sorted keys
    unsorted = _model(micro_config, attribute_heads={"size": 3, "category": 5}, attribute_embedding=True)
    unsorted.config.save_pretrained(tmp_path)
    assert list(ChatRexConfig.from_pretrained(tmp_path).attribute_heads) == ["size", "category"]
    with pytest.raises(ValueError, match="does not label"):
        WorldTasks(
            ChatRexProcessor(
                world_tokenizer,
                coco_like.config.__class__(**{**coco_like.config.to_dict(), "attribute_heads": {"brand": 3}}),
            ),
            WORLD,
        )
    with pytest.raises(ValueError, match="does not label"):
        world_model_options(["category", "texture"])
    headless = _model(micro_config, attribute_heads={})
    batch, _ = WorldTasks(ChatRexProcessor(world_tokenizer, headless.config), WORLD, seed=1).batch([0, 1])
    assert batch["attribute_labels"].shape[-1] == 0
    out = headless(**batch)
    assert torch.isfinite(out.loss) and float(out.losses["attributes"]) == 0.0


def _reloaded(model, batch, tmp_path):
    """The config of ``model`` saved and loaded again, after checking that the two give the same logits."""
    model.save_pretrained(tmp_path)
    again = ChatRexForConditionalGeneration.from_pretrained(tmp_path).eval()
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    tokens, without = _object_tokens_with_and_without(model, batch, "order_embedding", "none")
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        probs = visual["attribute_logits"].split(list(model.config.attribute_heads.values()), dim=-1)
        groupings = [[probs[0].softmax(-1)], [probs[0].softmax(-1), probs[1].softmax(-1)]]
        want = model.order_embedding(order_features(batch["boxes"], mask, groupings))
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0, 1])
    mask = batch["box_mask"]
    assert not mask.all()
    with torch.no_grad():
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
        probs = visual["attribute_logits"].split(list(model.config.attribute_heads.values()), dim=-1)
        category, color = probs[0].softmax(-1), probs[1].softmax(-1)
        order = order_features(batch["boxes"], mask, [[category], [category, color]])
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    probs = visual["attribute_logits"].split(list(model.config.attribute_heads.values()), dim=-1)
    category, color = probs[0].softmax(-1), probs[1].softmax(-1)
    order = order_features(batch["boxes"], mask, [[category], [category, color]])
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
        ChatRexConfig(order_embedding="pointer_reading", index_head="vocab")
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=2, task_weights={"refer": 1.0}).batch([0, 1])
    with torch.no_grad():  # its reading starts at zero: the scores are the plain pointer's
        assert torch.equal(model(**batch).logits, plain(**batch).logits)
        _as_if_trained(model)
        out = model(**batch)
        visual = model.encode_visual(*(batch[k] for k in ("pixel_low", "pixel_high", "rgb_high", "boxes", "box_mask")))
    category = visual["attribute_logits"][..., : model.config.attribute_heads["category"]].softmax(-1)
    assert torch.allclose(visual["object_alike"], category)
    b, k = batch["box_mask"].shape
    assert out.pointer_inputs["anchor_geometry"].shape == (b, k, k, ANCHOR_GEOMETRY)
    assert not torch.allclose(out.logits, plain(**batch).logits)
    with pytest.raises(ValueError, match="object_alike"):
        model(**batch, visual={k: v for k, v in visual.items() if k != "object_alike"})
    with pytest.raises(ValueError, match="anchor_pointer"):
        ChatRexConfig(anchor_pointer=True, index_head="vocab", attribute_heads={"category": 3})
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.anchor_pointer.parameters())
    assert _reloaded(model, batch, tmp_path).anchor_pointer


def test_order_targets_name_the_order_feature_an_expression_asks_for():
    red_circle = {"kind": "shape", "noun": "circle", "color": "red"}
    g = WORLD_ORDER_GROUPINGS
    # (grouping, direction, rank) -> column of order_features: category and colour, left, second
    assert order_target({"form": "ordinal", "k": 2, "direction": "left", "np": red_circle}, g) == 21
    assert order_target({"form": "extreme", "direction": "bottom", "np": {"kind": "person"}}, g) == 15
    assert order_target({"form": "extreme", "direction": "top", "np": {"kind": "person", "shirt": "red"}}, g) == 30
    assert order_target({"form": "np", "np": red_circle}, g) == -1
    # no grouping counts "red objects" or "small circles"
    assert order_target({"form": "extreme", "direction": "left", "np": {"kind": "shape", "color": "red"}}, g) == -1
    small = {"kind": "shape", "noun": "circle", "size": "small"}
    assert order_target({"form": "extreme", "direction": "left", "np": small}, g) == -1
    # a model counting by category alone has no column for "the second red circle"
    assert order_target({"form": "ordinal", "k": 2, "direction": "left", "np": red_circle}, [["category"]]) == -1
    assert order_target({"form": "extreme", "direction": "bottom", "np": {"kind": "person"}}, [["category"]]) == 15


def test_pointer_targets_give_each_group_its_anchor_and_the_order_feature_only_its_answer_has(
    world_tokenizer, micro_config
):
    """Against the world's own programs: a group's anchor boxes are the objects its expression's anchor
    selects, and counted from the true categories and colours, the expression's order feature is set on
    its answer's box and on no other box its noun phrase matches."""
    proc = ChatRexProcessor(world_tokenizer, micro_config)
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
            onehot = [(F.one_hot(labels[..., c].clamp(min=0), n) * (labels[..., c:c + 1] >= 0)).float() for c, n in
                      enumerate(micro_config.attribute_heads.values())][:2]  # fmt: skip
            boxes = torch.from_numpy(it.boxes)[None]
            present = torch.ones(1, len(it.boxes), dtype=torch.bool)
            counts = order_features(boxes, present, [[onehot[0]], [onehot[0], onehot[1]]])
            for g, program in enumerate(programs):
                anchors = torch.nonzero(batch["group_anchors"][i, g])[:, 0].tolist()
                if "anchor" in program:
                    want = set(evaluate(it.record.origin, program["anchor"]))
                    assert anchors and {it.box_objects[k] for k in anchors} == want
                    anchored += 1
                else:
                    assert anchors == []
                target = int(batch["group_order"][i, g])
                assert target == order_target(program, WORLD_ORDER_GROUPINGS)
                if target >= 0:
                    phrase, scene = NounPhrase(**program["np"]), it.record.origin
                    matches = [k for k, o in enumerate(it.box_objects)
                               if o is not None and phrase.matches(scene.get(o))]  # fmt: skip
                    has = [k for k in matches if counts[0, k, target] > 0.99]
                    assert has == it.qa.groups[g] and len(matches) > 1
                    ordered += 1
    assert anchored >= 5 and ordered >= 5  # so the checks above ran


def test_the_anchor_and_order_losses_teach_the_pointers_additions(world_tokenizer, micro_config):
    with pytest.raises(ValueError, match="needs anchor_pointer"):
        ChatRexConfig(anchor_loss_weight=0.5)
    with pytest.raises(ValueError, match="pointer_reading"):
        ChatRexConfig(order_loss_weight=0.5, anchor_pointer=True)
    options = {"anchor_pointer": True, "order_embedding": "pointer_reading"}
    proc = ChatRexProcessor(world_tokenizer, micro_config)
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
    """``ChatRexPerceiver.answer`` pads every per-object input, those of the pointer's additions too, to the
    batch's box count: an image answered beside another with more boxes gets the answer it gets alone."""
    model = _as_if_trained(_model(micro_config, **options))
    upn = UpnModel(UpnConfig(image_size=64, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], head_dim=16))
    perceiver = ChatRexPerceiver(model, upn, world_tokenizer)
    scenes = [generate_scene(s, WORLD) for s in (1, 2)]
    boxes = [np.array([o.box for o in sc.instances]) for sc in scenes]
    assert len(boxes[0]) != len(boxes[1])
    question = "Please detect circle; person in this image. Answer the question with object indexes."
    together = perceiver.ask_batch([sc.image for sc in scenes], [question] * 2, boxes)
    alone = [perceiver.ask(sc.image, question, boxes=b) for sc, b in zip(scenes, boxes, strict=True)]
    assert [a.text for a in together] == [a.text for a in alone]


@pytest.mark.parametrize("relation_layers", [0, 2])
def test_relation_layers_let_an_object_token_see_the_other_boxes(
    tmp_path, world_tokenizer, micro_config, relation_layers
):
    model = _model(micro_config, relation_layers=relation_layers).eval()
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
        ChatRexConfig(relation_layers=-1)


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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    (g,) = _decode(model, batch, world_tokenizer, max_new_tokens=len(forced) + 1, forced=[forced], constrained=False)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=3).batch([0, 1])
    with torch.no_grad():
        sdpa = model(**batch).logits
        model.language_model.set_attn_implementation("eager")
        assert model.language_model.config._attn_implementation == "eager"
        eager = model(**batch).logits
    finite = torch.isfinite(sdpa)
    assert torch.equal(finite, torch.isfinite(eager)) and torch.allclose(sdpa[finite], eager[finite], atol=1e-4)


def test_roi_placeholder_count_is_checked(world_tokenizer, micro_config):
    model = _model(micro_config)
    proc = ChatRexProcessor(world_tokenizer, model.config)
    batch, _ = WorldTasks(proc, WORLD, seed=1).batch([0])
    batch["box_mask"] = batch["box_mask"].clone()
    batch["box_mask"][0, 0] = False
    with pytest.raises(ValueError, match="placeholders"):
        model(**batch)


@pytest.mark.parametrize("index_head, budget", [("pointer", 40), ("vocab", 40), ("pointer", 7), ("vocab", 4)])
def test_constrained_decoding_is_always_well_formed(world_tokenizer, micro_config, index_head, budget):
    model = _model(micro_config, index_head=index_head).eval()
    proc = ChatRexProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=3)
    items = [data.item(i) for i in range(6)]
    batch = proc.collate([proc.example(it.qa.question, len(it.boxes)) for it in items], [it.boxes for it in items],
                         pad_left=True)  # fmt: skip
    batch.update(proc.images([it.image for it in items])[0])
    for g, it in zip(_decode(model, batch, world_tokenizer, max_new_tokens=budget), items, strict=True):
        text = detokenize(world_tokenizer.convert_ids_to_tokens(g.token_ids))
        parsed = chatrex.parse(text, len(it.boxes))
        assert parsed.problems == (), (text, parsed.problems)
        assert len(g.token_ids) <= budget
        assert all(0 <= k < len(it.boxes) for k, _ in _index_probs(g, world_tokenizer))
        assert all(0 < p <= 1 for _, p in _index_probs(g, world_tokenizer))


def test_a_micro_model_learns(world_tokenizer, micro_config):
    """Region category captions of one box: loss must fall well below its start in 80 steps."""
    model = _model(micro_config)
    proc = ChatRexProcessor(world_tokenizer, model.config)
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
    shipped = ChatRexPerceiver.from_pretrained(DEFAULT_MODEL).model.config
    for key, value in TINY.items():
        if isinstance(value, dict):
            # sub-configs are saved as dicts; the world tokenizer's size replaces vocab_size when a model is built
            saved = getattr(shipped, key)
            assert {k: saved.get(k) for k in value if k != "vocab_size"} == {
                k: v for k, v in value.items() if k != "vocab_size"
            }, key
        else:
            assert getattr(shipped, key) == value, key
    # what the world's data decided, as a folder saved before the heads were named says it
    assert list(shipped.attribute_heads) == list(WORLD_ATTRIBUTES) and shipped.order_groupings == WORLD_ORDER_GROUPINGS
    assert shipped.grid_attribute_heads == ["held_item", "held_item_color"]
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 30_000_000, f"checkpoints/tiny is {size / 1e6:.1f} MB"


def test_named_configs():
    world = world_model_options()
    assert named_config("tiny", **world).layout == "question_first"
    real = named_config("chatrex-7b")
    assert real.text().hidden_size == 3584 and real.vision().image_size == 336 and real.high_resolution == 768
    with pytest.raises(ValueError, match="unknown config"):
        named_config("huge")
    with pytest.raises(ValueError, match="layout"):
        ChatRexConfig(layout="sideways")
    with pytest.raises(ValueError, match="lacks: the training data must label"):  # the tiny one reads data-given heads
        named_config("tiny")
    tiny = named_config("tiny", **world)
    assert (tiny.box_tokens, tiny.index_token_features) == ("fused", True)
    assert (real.box_tokens, real.index_token_features) == ("pair", False)
    assert (tiny.roi_pooling, real.roi_pooling) == ("flatten", "mean")
    # a config.json saved before these options existed keeps meaning what it meant
    new_options = ("box_tokens", "index_token_features", "roi_pooling", "attribute_embedding", "grid_attribute_heads",
                   "coordinate_embedding", "relation_layers", "order_embedding", "anchor_pointer")  # fmt: skip
    old = ChatRexConfig(**{k: v for k, v in tiny.to_dict().items() if k not in new_options})
    assert (old.box_tokens, old.index_token_features, old.roi_pooling) == ("pair", False, "mean")
    assert not (old.attribute_embedding or old.grid_attribute_heads or old.coordinate_embedding or old.relation_layers)
    assert old.order_embedding == "none"
    assert tiny.attribute_embedding and tiny.grid_attribute_heads
    assert not (tiny.coordinate_embedding or tiny.relation_layers) and tiny.order_embedding == "pointer_reading"
    assert tiny.anchor_pointer and not (real.anchor_pointer or old.anchor_pointer)
    # the tiny models train on CPU, where eager attention is the faster at their lengths; the 7B keeps the default
    assert tiny.text()._attn_implementation == tiny.vision()._attn_implementation == "eager"
    assert real.text()._attn_implementation != "eager"
    # saved before "pointer_keys", order_embedding was a flag
    assert [ChatRexConfig(order_embedding=v, attribute_heads={"category": 2}).order_embedding
            for v in (False, True)] == ["none", "object_tokens"]  # fmt: skip
    with pytest.raises(ValueError, match="order_embedding"):
        ChatRexConfig(order_embedding="everywhere")
    assert not (real.attribute_embedding or real.grid_attribute_heads or real.coordinate_embedding)
    assert not real.relation_layers and not real.attribute_heads
    with pytest.raises(ValueError, match="box_tokens"):
        ChatRexConfig(box_tokens="triple")
    with pytest.raises(ValueError, match="roi_pooling"):
        ChatRexConfig(roi_pooling="max")
    assert (tiny.index_softmax, real.index_softmax, ChatRexConfig().index_softmax) == ("grammar", "vocabulary",
                                                                                        "vocabulary")  # fmt: skip
    with pytest.raises(ValueError, match="index_softmax"):
        ChatRexConfig(index_softmax="sparse")


def test_forced_phrases_give_the_asked_structure(world_tokenizer, micro_config):
    model = _model(micro_config).eval()
    proc = ChatRexProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=5)
    items = [data.item(i) for i in range(3)]
    asked = [["circle"], ["the red square", "person"], ["star", "cup", "flag"]]
    batch = proc.collate([proc.example("please detect", len(it.boxes)) for it in items], [it.boxes for it in items],
                         pad_left=True)  # fmt: skip
    batch.update(proc.images([it.image for it in items])[0])
    out = _decode(model, batch, world_tokenizer, phrases=asked, max_new_tokens=60)
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
    proc = ChatRexProcessor(world_tokenizer, model.config)
    data = WorldTasks(proc, WORLD, seed=6, task_weights={"detect": 1.0}, answer_format="coordinates")
    batch, _ = data.batch([0, 1])
    out = model(**batch)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.losses.values())
