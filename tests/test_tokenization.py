import random

from perceive.data.sources.world import scene_record
from perceive.data.tasks import TASKS, make_qa
from perceive.formats import chatrex
from perceive.tokenization import SPECIAL_TOKENS, detokenize, load_tokenizer
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe


def test_special_tokens_are_atomic_and_answers_round_trip(world_tokenizer):
    vocab = world_tokenizer.get_vocab()
    assert all(t in vocab for t in SPECIAL_TOKENS)
    assert world_tokenizer.tokenize("<ground>red circle</ground><objects><obj12></objects>") == [
        "<ground>", "red", "circle", "</ground>", "<objects>", "<obj12>", "</objects>"]  # fmt: skip
    cfg = WorldConfig(size=128, person_share=0.4)
    rng = random.Random(0)
    checked = 0
    for seed in range(25):
        scene = generate_scene(seed, cfg)
        record = scene_record(scene, describe(scene, cfg))
        box_objects = [o.id for o in scene.objects]
        for task in TASKS:
            qa = make_qa(task, record, box_objects, rng)
            if qa is None:
                continue
            ids = world_tokenizer(qa.answer, add_special_tokens=False)["input_ids"]
            if world_tokenizer.unk_token_id in ids:
                continue  # a word the 60-scene test vocabulary never met
            text = detokenize(world_tokenizer.convert_ids_to_tokens(ids))
            want = chatrex.parse(qa.answer, len(box_objects))
            got = chatrex.parse(text, len(box_objects))
            assert got.problems == ()
            assert [(g.phrase, g.indices) for g in got.groups] == [(g.phrase.lower(), g.indices) for g in want.groups]
            checked += 1
    assert checked > 150


def test_detokenize_layout():
    toks = ["a", "picture", "with", "<ground>", "a", "red", "cup", "</ground>", "<objects>", "<obj3>", "</objects>",
            ".", "<ground>", "x", "</ground>", "<objects>", "none", "</objects>"]  # fmt: skip
    assert (
        detokenize(toks) == "a picture with <ground>a red cup</ground><objects><obj3></objects>. <ground>x</ground>"
        "<objects>None</objects>"
    )
    assert (
        detokenize(["<ground>", "a", "</ground>", "<objects>", "<obj1>", "</objects>", "<ground>", "b"]).count("\n")
        == 1
    )


def test_saved_world_tokenizer_loads_back(world_tokenizer, tmp_path):
    world_tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.get_vocab() == world_tokenizer.get_vocab()
