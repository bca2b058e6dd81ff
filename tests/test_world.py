import collections
import random

import numpy as np
import pytest
import torch

from perceive.boxes import masks_to_boxes
from perceive.world import checker
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import EXPRESSION_KINDS, describe, evaluate
from perceive.world.scene import KEYPOINTS, SHAPES

CFG = WorldConfig(size=128, person_share=0.4, relation_depth=2)


def test_same_seed_same_scene_byte_for_byte():
    a, b = generate_scene(7, CFG), generate_scene(7, CFG)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label_map.tobytes() == b.label_map.tobytes() and a.depth.tobytes() == b.depth.tobytes()
    assert [vars(o) for o in a.objects] == [vars(o) for o in b.objects]
    la, lb = describe(a, CFG), describe(b, CFG)
    assert [e.to_json() for e in la.expressions] == [e.to_json() for e in lb.expressions]
    assert generate_scene(8, CFG).image.tobytes() != a.image.tobytes()


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"size": 10}, "size"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 5, "max_objects": 2}, "max_objects"),
        ({"person_share": 1.5}, "person_share"),
        ({"relation_depth": 3}, "relation_depth"),
        ({"max_objects": 99}, "max_objects"),
    ],
)
def test_invalid_config_is_rejected(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        generate_scene(0, WorldConfig(**kwargs))


def test_scene_content_and_geometry():
    kinds = collections.Counter()
    for seed in range(40):
        s = generate_scene(seed, CFG)
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        for o in s.objects:
            kinds[o.kind] += 1
            m = s.mask(o.id)
            assert m.sum() == o.area > 0
            assert masks_to_boxes(torch.from_numpy(m)[None])[0].tolist() == list(o.box)  # box of the mask is the box
            if o.kind == "part":
                parent = s.get(o.parent)
                assert parent.kind == "person" and (s.mask(parent.id) >= m).all()
            if o.kind == "person":
                parts = s.parts_of(o.id)
                assert {p.category for p in parts} >= {"head", "torso", "arm", "leg"}
                assert (o.hat is not None) == any(p.category == "hat" for p in parts)
                assert len(o.keypoints) == len(KEYPOINTS) and all(v in (1, 2) for _, _, v in o.keypoints)
                if o.holding is not None:
                    assert s.get(o.holding).held_by == o.id
        assert len(s.present_stuff()) >= 2 and "sky" in s.present_stuff()
    assert kinds["shape"] and kinds["person"] and kinds["item"] and kinds["part"]
    assert len({o.category for seed in range(40) for o in generate_scene(seed, CFG).of_kind("shape")}) == len(SHAPES)


def test_depth_agrees_with_occlusion():
    s = generate_scene(3, CFG)
    fg = s.label_map > 0
    assert (s.depth[~fg] <= 1.0).all() and (s.depth[fg] < 1.0).all()
    # objects drawn later (nearer) have smaller depth than the ones they cover
    z = {o.id: o.z for o in s.objects}
    by_depth = sorted(
        (o for o in s.objects if o.kind != "person"), key=lambda o: float(s.depth[s.label_map == o.id][0])
    )
    depths_z = [z[o.id] for o in by_depth]
    assert depths_z == sorted(depths_z, reverse=True)


def test_checker_agrees_with_generator_on_a_large_sample():
    counts, kinds, multi, total = collections.Counter(), set(), 0, 0
    for seed in range(250):
        s = generate_scene(seed, CFG)
        lang = describe(s, CFG)
        for e in lang.expressions:
            total += 1
            counts[e.domain] += 1
            kinds.add(e.kind)
            assert checker.answer(s, e.text) == e.answer, (seed, e.text)
            if e.domain == "rejection":
                assert e.answer == []
            else:
                assert e.answer, (seed, e.text)
                if e.sub_domain != "union":
                    assert checker.is_plural(e.text) == (len(e.answer) > 1), (seed, e.text)
            multi += len(e.answer) > 1
        for r in lang.regions:
            if r.referring is not None:
                assert checker.answer(s, r.referring) == [r.object], (seed, r.referring)
    assert set(counts) == {"property", "position", "interaction", "reasoning", "rejection"}
    assert kinds == set(EXPRESSION_KINDS)
    assert multi > 0.1 * total


def test_checker_is_independent_of_the_stored_answer():
    s = generate_scene(5, CFG)
    circles = sorted((o for o in s.instances if o.kind == "shape"), key=lambda o: o.center[0])
    assert checker.answer(s, "the leftmost object") == [circles[0].id]
    assert checker.answer(s, "The objects.") == sorted(o.id for o in circles)
    with pytest.raises(checker.ParseError):
        checker.answer(s, "the flying saucer")


def test_unique_descriptions_cover_most_objects():
    with_sentence = total = 0
    for seed in range(30):
        s = generate_scene(seed, CFG)
        for r in describe(s, CFG).regions:
            total += 1
            with_sentence += r.referring is not None
            assert r.category and r.short_phrase and r.brief
    assert with_sentence / total > 0.9


def test_captions_counting_region_qa_visual_prompts():
    for seed in range(20):
        s = generate_scene(seed, CFG)
        lang = describe(s, CFG)
        kinds = {c.kind for c in lang.captions}
        assert kinds == {"caption_brief", "caption_detailed"}
        for c in lang.captions:
            for p in c.phrases:
                assert c.text[p["span"][0] : p["span"][1]] == p["phrase"]
                assert all(s.get(i).kind != "part" for i in p["objects"])
        grounded = {i for p in lang.captions[1].phrases for i in p["objects"]}
        assert grounded == {o.id for o in s.instances}  # the detailed caption names every object
        for q in lang.questions:
            if q.kind == "count":
                assert q.answer == str(len(q.answer_objects))
            else:
                assert "<obj0>" in q.question and q.objects
        for vp in lang.visual_prompts:
            m = s.mask(vp.object)
            if vp.point is not None:
                assert m[int(vp.point[1]), int(vp.point[0])]
            if vp.scribble is not None:
                assert all(m[int(y), int(x)] for x, y in vp.scribble)
            if vp.box is not None:
                assert tuple(vp.box) == s.get(vp.object).box
            if vp.mask is not None:
                from perceive.boxes import rle_to_mask

                assert (rle_to_mask(vp.mask) == m).all()
    assert any(q.answer == "0" for seed in range(20) for q in describe(generate_scene(seed, CFG), CFG).questions)


def test_distractor_similarity_knob_makes_near_duplicates():
    def near_pairs(sim):
        n = 0
        for seed in range(60):
            shapes = generate_scene(seed, WorldConfig(size=128, distractor_similarity=sim, person_share=0)).of_kind(
                "shape"
            )
            for a in shapes:
                for b in shapes:
                    if a.id < b.id:
                        same = sum(getattr(a, k) == getattr(b, k) for k in ("category", "color", "pattern", "size"))
                        n += same == 3
        return n

    assert near_pairs(1.0) > 2 * near_pairs(0.0)


def test_object_count_knob():
    for seed in range(20):
        s = generate_scene(seed, WorldConfig(size=128, min_objects=5, max_objects=5, person_share=0))
        assert len(s.of_kind("shape")) == 5


def test_sheet_draws(tmp_path):
    from perceive.world.sheet import contact_sheet, draw_scene

    s = generate_scene(1, CFG)
    panel = draw_scene(s, describe(s, CFG), cell=128)
    assert panel.width == 128 and panel.height > 128
    sheet = contact_sheet([panel, panel, panel], columns=2)
    assert sheet.width > 256
    with pytest.raises(ValueError):
        contact_sheet([])


def test_random_programs_evaluate_like_checker():
    rng = random.Random(0)
    for seed in range(30):
        s = generate_scene(seed, CFG)
        for o in rng.sample(s.instances, min(2, len(s.instances))):
            from perceive.world.language import render, unique_program

            prog = unique_program(s, o)
            if prog is not None:
                assert evaluate(s, prog) == [o.id]
                assert checker.answer(s, render(prog, False)) == [o.id]
