"""A smoke model trains from small files of every format the data spec reads, and ``perceive.load`` (and
``perceive ask --model``) loads what it trained."""

import json

import numpy as np
import pytest
import torch
from cli_runner import run_cli
from PIL import Image

import perceive
from perceive.train.trainer import train

W, H = 96, 64  # not square: boxes are normalised by the longer side


def _image(path, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = np.full((H, W, 3), 200, dtype=np.uint8)
    arr[8:40, 10:40] = rng.integers(0, 255, 3)
    arr[20:60, 50:90] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)


def _coco(root, lvis=False):
    for k in range(3):
        _image(root / "images" / f"{k}.png", k, "L" if k == 2 else "RGB")
    images = [{"id": 10 + k, "file_name": f"{k}.png", "width": W, "height": H} for k in range(3)]
    if lvis:
        for im in images:
            im.update(neg_category_ids=[7], not_exhaustive_category_ids=[])
    anns = []
    for k in range(3):
        anns.append({"id": 100 + 2 * k, "image_id": 10 + k, "category_id": 3, "bbox": [10, 8, 30, 32], "area": 960,
                     "iscrowd": 0, "segmentation": [[10, 8, 40, 8, 40, 40, 10, 40]]})  # fmt: skip
        anns.append({"id": 101 + 2 * k, "image_id": 10 + k, "category_id": 9, "bbox": [50, 20, 40, 40], "area": 1600,
                     "iscrowd": 0, "segmentation": [[50, 20, 90, 20, 90, 60, 50, 60]]})  # fmt: skip
    categories = [{"id": 3, "name": "box"}, {"id": 7, "name": "cat"}, {"id": 9, "name": "square"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    return {"format": "lvis" if lvis else "coco", "annotations": "instances.json", "images": "images/"}


def _panoptic(root):
    from perceive.world.export import id_map_to_rgb

    anns = []
    for k in range(2):
        _image(root / "images" / f"{k}.png", k)
        seg = np.zeros((H, W), dtype=np.int32)
        seg[:] = 1000  # stuff everywhere else
        seg[8:40, 10:40], seg[20:60, 50:90] = 1, 2
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(id_map_to_rgb(seg)).save(root / "masks" / f"{k}.png")
        infos = [{"id": 1, "category_id": 1, "bbox": [10, 8, 30, 32], "area": 960, "iscrowd": 0},
                 {"id": 2, "category_id": 2, "bbox": [50, 20, 40, 40], "area": 1600, "iscrowd": 0},
                 {"id": 1000, "category_id": 3, "bbox": [0, 0, W, H], "area": W * H - 2560, "iscrowd": 0}]  # fmt: skip
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": infos})
    data = {"images": [{"id": k, "file_name": f"{k}.png", "width": W, "height": H} for k in range(2)],
            "annotations": anns, "categories": [{"id": 1, "name": "box", "isthing": 1},
                                                {"id": 2, "name": "square", "isthing": 1},
                                                {"id": 3, "name": "wall", "isthing": 0}]}  # fmt: skip
    (root / "panoptic.json").write_text(json.dumps(data))
    return {"format": "panoptic", "annotations": "panoptic.json", "masks": "masks/", "images": "images/"}


def _refcoco(root):
    _coco(root)
    refs = [{"ref_id": k, "ann_id": 100 + 2 * k, "image_id": 10 + k, "category_id": 3, "split": "train",
             "sentences": [{"sent_id": k, "sent": "the box on the left"}]} for k in range(3)]  # fmt: skip
    (root / "refs.json").write_text(json.dumps(refs))
    return {"format": "refcoco", "refs": "refs.json", "instances": "instances.json", "images": "images/",
            "split": "train"}  # fmt: skip


def _humanref(root):
    lines = []
    for k in range(3):
        _image(root / "images" / f"{k}.png", k)
        boxes = [[10, 8, 40, 40], [50, 20, 90, 60]]
        lines.append({"id": f"{k}_0", "image_name": f"{k}.png", "referring": "the person on the right",
                      "candidate_boxes": boxes, "answer_boxes": [boxes[1]], "domain": "position",
                      "sub_domain": "relation"})  # fmt: skip
        lines.append({"id": f"{k}_1", "image_name": f"{k}.png", "referring": "the person with wings",
                      "candidate_boxes": boxes, "answer_boxes": [], "domain": "rejection"})  # fmt: skip
    (root / "humanref.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"format": "humanref", "annotations": "humanref.jsonl", "images": "images/"}


def _jsonl(root):
    lines = []
    for k in range(3):
        _image(root / "photos" / f"{k}.png", k, "RGBA")
        lines.append({"image": f"{k}.png", "boxes": [[10, 8, 40, 40], [50, 20, 90, 60]], "labels": ["mug", "plate"],
                      "expressions": [{"text": "the plate", "boxes": [1]}]})  # fmt: skip
    (root / "mine.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"format": "jsonl", "annotations": "mine.jsonl", "images": "photos/"}


def _world(root):
    from perceive.world.export import write_dataset
    from perceive.world.generator import WorldConfig

    write_dataset(root / "world", 3, 5, WorldConfig(size=64, max_objects=4), progress=False)
    return {"format": "world", "path": "world/"}


# a category each dataset names, so the (word-level) tokenizer knows it
ASKED = {"coco": "box", "lvis": "box", "panoptic": "box", "refcoco": "box", "humanref": "person", "jsonl": "mug",
         "world": "circle"}  # fmt: skip
FORMATS = {"coco": _coco, "lvis": lambda root: _coco(root, lvis=True), "panoptic": _panoptic, "refcoco": _refcoco,
           "humanref": _humanref, "jsonl": _jsonl, "world": _world}  # fmt: skip


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_smoke_model_trains_from_each_format_and_loads(tmp_path, fmt):
    source = FORMATS[fmt](tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"sources": [source]}))
    out = train("smoke", tmp_path / "run", progress=False, data=spec)
    model = perceive.load(out / "model")
    assert json.loads((out / "recipe.json").read_text())["data"] == str(spec)
    image = next(tmp_path / d for d in ("images", "photos", "world/images") if (tmp_path / d).is_dir()).glob("*.png")
    phrase = ASKED[fmt]
    answer = model.ask(next(image), f"Please detect {phrase} in this image. Answer the question with object indexes.")
    assert answer.text.startswith(f"<ground>{phrase}</ground><objects>")
    assert (out / "proposals.safetensors").is_file()
    if fmt in ("coco", "lvis"):  # the heads come from the data: its categories, and nothing else
        assert model.model.config.attribute_heads == {"category": 3}
    if fmt == "world":
        assert "held_item" in model.model.config.attribute_heads


def test_the_command_trains_from_a_spec_and_ask_loads_it(tmp_path):
    source = _jsonl(tmp_path)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"sources": [source]}))
    run = run_cli("train", "--config", "smoke", "--out", tmp_path / "run", "--data", spec, "--loader-workers", "1",
                  "--quiet")  # fmt: skip
    assert run.returncode == 0, run.stderr
    ask = run_cli(
        "ask",
        "--model",
        tmp_path / "run" / "model",
        tmp_path / "photos" / "0.png",
        "Please detect mug in this image. Answer the question with object indexes.",
        "--json",
    )
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["answer"].startswith("<ground>mug</ground>")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sources": [{"format": "coco", "annotations": "mine.jsonl", "images": "photos/"}]}))
    fails = run_cli("train", "--config", "smoke", "--out", tmp_path / "bad_run", "--data", bad)
    assert fails.returncode == 1 and "Traceback" not in fails.stderr and "mine.jsonl" in fails.stderr


def test_batches_made_by_a_worker_are_those_made_in_process_and_a_killed_run_resumes_to_them(tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file

    from perceive.train.trainer import RECIPES

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"sources": [_world(tmp_path)]}))
    in_process = train(replace(RECIPES["smoke"], loader_workers=0), tmp_path / "a", progress=False, data=spec)
    worker = replace(RECIPES["smoke"], loader_workers=1)
    stopped = train(worker, tmp_path / "b", progress=False, data=spec, stop_after=3)  # a run killed at step 3
    assert not (stopped / "model").is_dir()
    resumed = train(worker, tmp_path / "b", progress=False, data=spec)
    a = load_file(str(in_process / "model" / "model.safetensors"))
    b = load_file(str(resumed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
