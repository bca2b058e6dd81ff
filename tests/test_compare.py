import json

import pytest
import torch

from perceive import compare
from perceive.data.sources.world import scene_record
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.upn.modeling_upn import UpnConfig, UpnModel
from perceive.train.data import coordinate_answer
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe


def test_coordinate_answers_tokenize_without_unknown_words(micro_config):
    tok = _tok(micro_config)
    scene = generate_scene(1, WorldConfig(size=256))
    text = coordinate_answer(scene_record(scene, describe(scene)), ["circle"], [[o.id for o in scene.instances[:2]]])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)


def test_coordinate_answers_parse_back_to_the_boxes():
    from perceive.formats import coords

    scene = generate_scene(1, WorldConfig(size=256))
    ids = [o.id for o in scene.instances[:3]]
    text = coordinate_answer(scene_record(scene, describe(scene)), ["things", "nothing"], [ids, []])
    assert text.endswith("nothing None")
    boxes = compare._coordinate_boxes(text, 256)
    assert len(boxes) == 3
    for got, o in zip(boxes, scene.instances[:3], strict=True):
        assert max(abs(a - b) for a, b in zip(got, o.box, strict=True)) <= 256 / 2000 + 1e-9
    assert all(b.phrase == "things" for b in coords.parse(text, units="bins").boxes)


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_on_micro_models(tmp_path, micro_config, monkeypatch):
    monkeypatch.setattr(compare, "numbers_tokenizer", lambda out: _tok(micro_config))
    cfg = compare.CompareConfig(
        steps=2,
        batch_size=2,
        eval_scenes=2,
        decode_objects=(1, 3),
        world={"size": 128, "min_objects": 3, "max_objects": 6, "person_share": 0.2},
    )
    torch.manual_seed(0)
    upn = UpnModel(UpnConfig(**micro_config.upn_config))

    def factory(tok):
        """The micro model, its vocabulary widened to the tokenizer with numbers."""
        from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
        from perceive.tokenization import IMAGE, OBJ_TOKENS, ROI

        ids = tok.convert_tokens_to_ids
        d = micro_config.to_dict()
        d["text_config"] = {**d["text_config"], "vocab_size": len(tok)}
        d.update(image_token_id=ids(IMAGE), roi_token_id=ids(ROI), obj_token_ids=[ids(t) for t in OBJ_TOKENS])
        return ChatRexForConditionalGeneration(ChatRexConfig(**d))

    report = compare.run(cfg, tmp_path, upn, model_factory=factory, progress=False)
    assert set(report["accuracy"]) == {"indices", "coordinates"}
    assert sum(r["questions"] for r in report["accuracy"]["indices"].values()) > 0
    cost = {(r["format"], r["objects"], r["batch"]): r["tokens"] for r in report["decode"]}
    assert cost[("indices", 3, 1)] < cost[("coordinates", 3, 1)]  # 1 token a box against 9
    assert (tmp_path / "comparison.png").is_file()
    assert json.loads((tmp_path / "comparison.json").read_text())["config"]["steps"] == 2
    assert "| >10 |" in compare.markdown(report)


_TOK = {}


def _tok(micro_config):
    """The test vocabulary plus numbers (the micro model's vocabulary must cover them)."""
    from perceive.tokenization import build_world_tokenizer, world_vocabulary

    if "t" not in _TOK:
        _TOK["t"] = build_world_tokenizer([*world_vocabulary(n_scenes=60), *compare.COORDINATE_WORDS])
    return _TOK["t"]
