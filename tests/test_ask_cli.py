"""``perceive ask`` with the user's own boxes and visual prompts, on the shipped checkpoint."""

import json

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

from perceive.world.generator import WorldConfig, generate_scene

QUESTION = "Please detect person in this image. Answer the question with object indexes."


def _cli(*args):
    return run_cli(*args)


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    scene = generate_scene(987_654, WorldConfig(size=256, person_share=0.35, relation_depth=2))
    path = tmp_path_factory.mktemp("ask") / "scene.png"
    Image.fromarray(scene.image).save(path)
    people = [list(o.box) for o in scene.instances if o.category == "person"]
    return path, people


def test_boxes_inline_and_from_a_file(scene_png, tmp_path):
    path, people = scene_png
    boxes = [[0, 0, 20, 20], *people]
    r = _cli("ask", str(path), QUESTION, "--boxes", json.dumps(boxes), "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert np.allclose([p["box"] for p in answer["proposals"]], boxes)
    assert answer["objects"] and all(1 <= o["index"] < len(boxes) for o in answer["objects"])
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    from_file = _cli("ask", str(path), QUESTION, "--boxes", str(tmp_path / "boxes.json"), "--json")
    assert from_file.returncode == 0 and json.loads(from_file.stdout) == answer


@pytest.mark.parametrize("args, message", [
    (["--boxes", "[[1, 2, 3]]"], "--boxes must be a list of [x0, y0, x1, y1] boxes"),
    (["--boxes", "[[1, 2,"], "--boxes: not valid JSON"),
    (["--boxes", "missing.json"], "no such file"),
    (["--prompt", "point:5,5"], "no visual prompts: give the region as a box"),
    (["--prompt", "point:999,5"], "outside the 256x256 image"),
    (["--prompt", "lasso:1,2"], "--prompt: a prompt is KIND:VALUES"),
])  # fmt: skip
def test_bad_boxes_and_prompts_are_one_line_errors(scene_png, args, message):
    path, _ = scene_png
    r = _cli("ask", str(path), QUESTION, *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
