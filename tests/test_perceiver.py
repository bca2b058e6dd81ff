"""One way to use any model: ``perceive.load`` picks the model from the folder, ``ask`` answers; the
shipped checkpoint (saved before the retrieval model was named ChatRex) answers exactly as it did."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import perceive
from perceive.data.templates import CHATREX_TEMPLATES
from perceive.models.chatrex.legacy import LEGACY_MODEL_TYPE
from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.perceiver import DEFAULT_MODEL, ModelFolderError, Perceiver, load
from perceive.prompts import VisualPrompt
from perceive.world.generator import WorldConfig, generate_scene

GOLDEN = json.loads((Path(__file__).parent / "data" / "shipped_answers.json").read_text())
WORLD = WorldConfig(size=256, person_share=0.35, relation_depth=2)


@pytest.fixture(scope="module")
def shipped():
    return perceive.load()


def _same_answer(got: dict, want: dict) -> None:
    assert got["answer"] == want["answer"]
    assert [o["index"] for o in got["objects"]] == [o["index"] for o in want["objects"]]
    for g, w in zip(got["objects"], want["objects"], strict=True):
        assert g["phrase"] == w["phrase"] and g["score"] == pytest.approx(w["score"], abs=2e-4)
        assert np.allclose(g["box"], w["box"], atol=0.02)
    assert len(got["proposals"]) == want["proposals"]
    for g, w in zip(got["proposals"], want["first_proposals"], strict=False):
        assert np.allclose(g["box"], w["box"], atol=0.02) and g["score"] == pytest.approx(w["score"], abs=2e-4)


def test_the_shipped_checkpoint_answers_exactly_as_before_the_rename(shipped):
    """Answers recorded with the code before the models moved into their folders (``tests/data``)."""
    assert isinstance(shipped, ChatRexPerceiver)
    assert json.loads((DEFAULT_MODEL / "config.json").read_text())["model_type"] == LEGACY_MODEL_TYPE
    by_seed: dict[int, list[dict]] = {}
    for rec in GOLDEN:
        by_seed.setdefault(rec["seed"], []).append(rec)
    for seed, recs in by_seed.items():
        image = generate_scene(seed, WORLD).image
        answers = shipped.ask_batch([image] * len(recs), [r["question"] for r in recs])
        for rec, answer in zip(recs, answers, strict=True):
            _same_answer(answer.to_json(), rec)


def test_a_model_saved_now_loads_by_its_model_type_and_answers_the_same(shipped, tmp_path):
    folder = tmp_path / "model"
    shipped.model.save_pretrained(folder)
    shipped.tokenizer.save_pretrained(folder)
    shipped.upn.save_pretrained(folder / "upn")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "chatrex"
    again = Perceiver.from_pretrained(folder)
    assert (
        isinstance(again, ChatRexPerceiver)
        and again.model.config.attribute_heads == shipped.model.config.attribute_heads
    )
    rec = GOLDEN[1]
    image = generate_scene(rec["seed"], WORLD).image
    _same_answer(again.ask(image, rec["question"]).to_json(), rec)
    assert ChatRexPerceiver.from_pretrained(folder).model_types() == ("chatrex", LEGACY_MODEL_TYPE)


def _folder_with_config(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize(
    "config, message",
    [("{}", "names no model_type"), ("[1, 2]", "names no model_type"), ("{not json", "not valid JSON"),
     ('{"model_type": "bert"}', "'bert' is not a perceive model; known: chatrex"),
     ('{"model_type": 7}', "names no model_type")],
)  # fmt: skip
def test_a_folder_that_is_no_perceive_model_is_named_in_one_clear_error(tmp_path, config, message):
    folder = _folder_with_config(tmp_path, config)
    with pytest.raises(ModelFolderError, match=message) as e:
        load(folder)
    assert str(folder / "config.json") in str(e.value)


def test_missing_folders_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load(tmp_path)
    folder = _folder_with_config(tmp_path, '{"model_type": "chatrex"}')
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is missing"):
        load(folder)
    shutil.copytree(DEFAULT_MODEL, tmp_path / "copy")
    (tmp_path / "copy" / "upn" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"upn/model\.safetensors is missing"):
        load(tmp_path / "copy")


def test_the_users_boxes_replace_the_proposals(shipped):
    """RexSeek's use: a detector's boxes in, the model picks among them; confidences are the index's
    probability (the boxes' scores default to 1)."""
    scene = generate_scene(GOLDEN[0]["seed"], WORLD)
    people = [list(o.box) for o in scene.instances if o.category == "person"]
    others = [list(o.box) for o in scene.instances if o.category != "person"][:2]
    boxes = others + people
    answer = shipped.ask(scene.image, CHATREX_TEMPLATES["detect"].format(obj="person"), boxes=boxes)
    assert np.allclose([p["box"] for p in answer.proposals], boxes)
    assert answer.objects and all(o.index is not None and o.index < len(boxes) for o in answer.objects)
    assert {o.index for o in answer.objects} <= set(range(len(others), len(boxes)))  # only the people
    assert all(0 < o.score <= 1 for o in answer.objects)
    flat = shipped.ask(scene.image, CHATREX_TEMPLATES["region_category"].format(obj="<obj0>"), boxes=people[0])
    assert len(flat.proposals) == 1
    for bad in ([[1, 2, 3]], [[5, 5, 1, 1]], [[0, 0, float("nan"), 4]], "boxes"):
        with pytest.raises(ValueError, match="x0, y0, x1, y1"):
            shipped.ask(scene.image, "Please detect person in this image.", boxes=bad)


def test_the_retrieval_model_refuses_visual_prompts_with_what_to_do_instead(shipped):
    scene = generate_scene(GOLDEN[0]["seed"], WORLD)
    with pytest.raises(ValueError, match="no visual prompts: give the region as a box"):
        shipped.ask(scene.image, "What is this?", prompts=[VisualPrompt("point", points=[(10, 10)])])


def test_the_package_exports_the_api_lazily():
    assert perceive.load is load and perceive.Perceiver is Perceiver
    assert perceive.Answer.__module__ == "perceive.answer"
    with pytest.raises(AttributeError):
        perceive.nothing  # noqa: B018


def test_a_folder_saved_before_assistant_token_id_existed_still_loads(tmp_path):
    """Causal models never read the field; its default (-1) is not a token id to check."""
    folder = tmp_path / "older"
    shutil.copytree(DEFAULT_MODEL, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["assistant_token_id"]
    (folder / "config.json").write_text(json.dumps(config))
    older = load(folder)
    assert older.model.config.assistant_token_id == -1
    rec = GOLDEN[0]
    _same_answer(older.ask(generate_scene(rec["seed"], WORLD).image, rec["question"]).to_json(), rec)
    config["prefix_attention"] = "bidirectional"  # which reads it: then it must be the tokenizer's
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="assistant_token_id is -1"):
        load(folder)
