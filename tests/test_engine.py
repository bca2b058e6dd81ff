"""The data engine: its phrase rule, each filter, resumable runs, its files read back by the data sources, the
shipped model's default parts, and Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

from perceive.data.sources.humanref import HumanRefSource
from perceive.data.spec import load_spec
from perceive.engine import EngineConfig, EngineParts
from perceive.engine.phrases import Phrase, chunk, head_noun, is_abstract
from perceive.engine.run import EngineFolderError, list_images, run
from perceive.engine.stages import Grounding, consistent, context_boxes

CAPTION = "A red thing, a blue thing and a green thing next to a big thing in the background."
# phrase -> its boxes and scores, as the fake grounder finds them
BOXES = {
    "a red thing": [([4, 4, 20, 20], 0.9), ([4, 4, 20, 21], 0.8)],  # the second a duplicate of the first
    "a blue thing": [([30, 4, 40, 14], 0.1)],  # low score
    "a green thing": [([4, 30, 14, 40], 0.7)],  # described as a ball: inconsistent
    "a big thing": [([30, 30, 60, 60], 0.6)],  # its expression finds nothing: not regrounded
    "the red thing": [([4, 4, 20, 20], 0.95)],
}


class FakeCaptioner:
    def __call__(self, images):
        return [(CAPTION, None) for _ in images]


class FakeGrounder:
    def __init__(self, fail_on_size: int | None = None) -> None:
        self.fail_on_size = fail_on_size

    def __call__(self, images, phrases):
        if any(im.shape[1] == self.fail_on_size for im in images):
            raise RuntimeError("this image breaks the grounder")
        return [[Grounding(k, box, score) for k, p in enumerate(ps) for box, score in BOXES.get(p.lower(), [])]
                for ps in phrases]  # fmt: skip


class FakeRegionCaptioner:
    def __call__(self, images, regions):
        return [[{"category": "ball" if "green" in phrase else head_noun(phrase), "short_phrase": phrase,
                  "brief": phrase + " here", "referring": "The " + phrase.split(" ", 1)[1] + "."}
                 for _, phrase in rs] for rs in regions]  # fmt: skip


def fake_parts(grounder: FakeGrounder | None = None) -> EngineParts:
    return EngineParts(captioner=FakeCaptioner(), grounder=grounder or FakeGrounder(),
                       region_captioner=FakeRegionCaptioner())  # fmt: skip


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, width in enumerate((64, 65, 66)):
        Image.fromarray(rng.integers(0, 255, (64, width, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return folder


def test_noun_phrases_and_the_abstract_filter():
    phrases = chunk("There is a dog and two red cups on the left of the image, near a man's hat.")
    assert [p.text for p in phrases] == ["a dog", "two red cups", "the left", "the image", "a man's hat"]
    text = "a dog and two red cups"
    assert all(text[p.span[0] : p.span[1]] == p.text for p in chunk(text))
    assert [is_abstract(p.text) for p in phrases] == [False, False, True, True, False]
    assert chunk("of the, and.") == [] and chunk("") == []
    assert (head_noun("Two red Cups"), head_noun("three boxes"), head_noun("the glass"), head_noun("")) == (
        "cup", "box", "glass", "")  # fmt: skip
    assert consistent("person", "a person in a green shirt") and consistent("Cups", "two red cups")
    assert consistent("person", "two people in red shirts")
    assert not consistent("ball", "a person in a green shirt") and not consistent("", "a cup")


def test_context_boxes_put_each_region_among_the_proposals():
    proposals = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=float)
    boxes, where = context_boxes(proposals, [[20, 20, 30, 30.2], [50, 50, 60, 60]])
    assert where == [1, 2] and boxes[2] == [50, 50, 60, 60] and len(boxes) == 3


def test_each_filter_drops_what_it_says_and_the_files_read_back(images, tmp_path):
    out = tmp_path / "out"
    summary = run(images, out, EngineConfig(), fake_parts(), progress=False)
    assert summary["images"] == 4 and summary["annotated"] == 3 and summary["errors"] == {"read": 1}
    assert summary["phrases"] == {"kept": 12, "dropped": {"abstract": 3}}  # 4 and 1 an image
    assert summary["regions"] == {"grounded": 15, "kept": 6, "dropped": {
        "low_score": 3, "duplicate": 3, "inconsistent": 3, "no_expression": 0, "not_regrounded": 0}}  # fmt: skip
    assert summary["expressions"] == 3 and summary["expressions_dropped"] == {"not_regrounded": 3}
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    broken = next(r for r in results if r["id"] == "broken")
    assert broken["error"].startswith("read: ") and "regions" not in broken
    first = next(r for r in results if r["id"] == "im0")
    assert {r["phrase"]: r["dropped"] for r in first["regions"] if r["score"] != 0.8} == {
        "A red thing": None,
        "a blue thing": "low_score",
        "a green thing": "inconsistent",
        "a big thing": None,
    }
    big = next(r for r in first["regions"] if r["phrase"] == "a big thing")
    assert (big["expression"], big["rejected_expression"], big["expression_dropped"]) == (
        None, "the big thing", "not_regrounded")  # fmt: skip
    # the engine's own JSONL, through the spec it writes: what perceive train --data reads
    spec = load_spec(out / "spec.json")
    record = spec.sources[0].record(0)
    assert [(i.category, i.box) for i in record.instances] == [("thing", [4.0, 4.0, 20.0, 20.0]),
                                                               ("thing", [30.0, 30.0, 60.0, 60.0])]  # fmt: skip
    assert [(e.text, e.answer) for e in record.expressions] == [("the red thing", [0])]
    # the big thing's sentence failed its check: it is no unique description, so it is not written
    assert [(r.short_phrase, r.brief, r.referring) for r in record.regions] == [
        ("A red thing", "A red thing here", "The red thing."), ("a big thing", "a big thing here", "")]  # fmt: skip
    [cap] = record.captions
    assert cap.text == CAPTION and [(p.phrase, p.objects) for p in cap.phrases] == [("A red thing", [0]),
                                                                                    ("a big thing", [1])]  # fmt: skip
    assert record.negative_categories == [] and record.questions == []  # the engine labels no category exhaustively
    # COCO instances and HumanRef-style referring lines
    from pycocotools.coco import COCO

    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) == 6
    assert coco.loadAnns(coco.getAnnIds())[0]["bbox"] == [4, 4, 16, 16]
    humanref = HumanRefSource(out / "referring.jsonl", out)
    assert len(humanref) == 3 and humanref.record(0).expressions[0].text == "the red thing"


def test_a_failed_check_can_drop_the_whole_region(images, tmp_path):
    config = EngineConfig(verify_drops="region")
    summary = run(images, tmp_path / "out", config, fake_parts(), progress=False)
    assert summary["regions"]["kept"] == 3 and summary["regions"]["dropped"]["not_regrounded"] == 3
    assert summary["expressions_dropped"] == {}
    with pytest.raises(ValueError, match="verify_drops"):
        EngineConfig(verify_drops="phrase")
    with pytest.raises(ValueError, match="min_score must be in"):
        EngineConfig(min_score=2)


def test_a_stage_failing_on_one_image_records_it_and_goes_on(images, tmp_path):
    summary = run(images, tmp_path / "out", EngineConfig(), fake_parts(FakeGrounder(fail_on_size=65)),
                  progress=False)  # fmt: skip
    assert summary["annotated"] == 2 and summary["errors"] == {"read": 1, "ground": 1}
    results = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "out/results.jsonl").open()}
    assert results["im1"]["error"] == "ground: RuntimeError: this image breaks the grounder"


def test_runs_resume_without_repeating_and_refuse_another_runs_folder(images, tmp_path):
    whole = tmp_path / "whole"
    run(images, whole, EngineConfig(), fake_parts(), progress=False)
    out = tmp_path / "out"
    run(images, out, EngineConfig(), fake_parts(), progress=False, limit=2)
    results = out / "results.jsonl"
    assert len(results.read_text().splitlines()) == 2
    with open(results, "ab") as f:  # a kill mid-line
        f.write(b'{"id": "im0", "regi')
    summary = run(images, out, EngineConfig(), fake_parts(), progress=False)
    assert summary["skipped_as_done"] == 2
    again = run(images, out, EngineConfig(), fake_parts(), progress=False)
    assert again["skipped_as_done"] == 4 and again["images"] == 4
    assert len(results.read_text().splitlines()) == 4
    for name in ("annotations.jsonl", "instances.json", "referring.jsonl"):
        assert (out / name).read_text() == (whole / name).read_text()
    with pytest.raises(EngineFolderError, match=r"differs in min_score.*--continue"):
        run(images, out, EngineConfig(min_score=0.5), fake_parts(), progress=False)
    assert run(images, out, EngineConfig(min_score=0.5), fake_parts(), progress=False, continue_run=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(EngineFolderError, match="holds no engine run"):
        run(images, other, EngineConfig(), fake_parts(), progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_image_lists_from_a_jsonl(images, tmp_path):
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"image": "images/im0.png"}\n{"image": "images/im1.png", "id": "x"}\n')
    assert [(it["id"], it["image"]) for it in list_images(listing)] == [
        ("im0", str(tmp_path / "images/im0.png")), ("x", str(tmp_path / "images/im1.png"))]  # fmt: skip
    listing.write_text('{"image": "a.png"}\n{"image": "b/a.png"}\n')
    with pytest.raises(ValueError, match="ids repeat"):
        list_images(listing)
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "missing")


@pytest.fixture(scope="module")
def world_images(tmp_path_factory):
    from perceive.world.generator import generate_scene

    folder = tmp_path_factory.mktemp("world")
    for k in range(2):
        Image.fromarray(generate_scene(900_000 + k).image).save(folder / f"scene{k}.png")
    return folder


def test_the_shipped_model_annotates_world_images_from_the_command_line(world_images, tmp_path):
    out = tmp_path / "out"
    done = run_cli("engine", "run", "--images", world_images, "--out", out, "--quiet", "--draw")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["scene0.png", "scene1.png"]
    assert "regions grounded:" in done.stdout and "perceive train --data" in done.stdout
    lines = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and sum(len(line["boxes"]) for line in lines) >= 1
    assert all(line["captions"][0]["text"] for line in lines)
    again = run_cli("engine", "run", "--images", world_images, "--out", out, "--quiet", "--min-score", "0.9")
    assert again.returncode == 1 and "--continue" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.slow
def test_ray_gives_what_a_local_run_gives(world_images, tmp_path):
    pytest.importorskip("ray")
    local = run(world_images, tmp_path / "local", progress=False)
    on_ray = run(world_images, tmp_path / "ray", ray="auto", progress=False)
    assert on_ray["annotated"] == local["annotated"] == 2
    assert on_ray["regions"] == local["regions"] and on_ray["expressions"] == local["expressions"]
    read = [sorted(json.loads(line)["boxes"] for line in (tmp_path / name / "annotations.jsonl").open())
            for name in ("local", "ray")]  # fmt: skip
    assert read[0] == read[1]


def test_phrase_spans_from_a_grounding_captioner_are_kept():
    from perceive.engine.stages import PhraseStage

    item = {"caption": "a dog near a tree", "caption_phrases": [{"text": "a dog near a tree", "span": [0, 17]}]}
    PhraseStage(None).process([item])
    assert item["phrases"] == [{"text": "a dog near a tree", "span": [0, 17]}]
    item = {"caption": "a dog near a tree", "caption_phrases": None}
    PhraseStage(None).process([item])
    assert [p["text"] for p in item["phrases"]] == ["a dog", "a tree"]
    item = {"caption": "a dog", "caption_phrases": None}
    PhraseStage(lambda text: [Phrase("dog", (2, 5))]).process([item])
    assert item["phrases"] == [{"text": "dog", "span": [2, 5]}]
