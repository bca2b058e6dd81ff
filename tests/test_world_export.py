import json

import numpy as np
import pytest
from cli_runner import run_cli

from perceive.boxes import rle_to_mask
from perceive.data import readers
from perceive.world import export
from perceive.world.generator import WorldConfig, generate_scene

CFG = WorldConfig(size=128, person_share=0.4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "world"
    export.write_dataset(out, 6, seed=2, config=CFG, progress=False)
    return out


def test_layout(dataset):
    names = sorted(p.name for p in (dataset / "images").iterdir())
    assert names == [export.image_name(i) for i in range(6)]
    for f in ("instances.json", "panoptic.json", "humanref.jsonl", "refs.json", "language.jsonl", "world.json"):
        assert (dataset / f).is_file()
    meta = json.loads((dataset / "world.json").read_text())
    assert meta["n"] == 6 and meta["config"]["size"] == 128


def test_coco_instances_load_and_match_scenes(dataset):
    coco = readers.load_coco(dataset / "instances.json")
    assert len(coco.getImgIds()) == 6
    for img in coco.loadImgs(coco.getImgIds()):
        scene = generate_scene(img["seed"], CFG)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(scene.objects)
        for ann in anns:
            obj = scene.get(ann["id"] - img["id"] * 1000)
            mask = coco.annToMask(ann).astype(bool)
            assert (mask == scene.mask(obj.id)).all()
            assert readers.coco_box(ann) == list(obj.box)
            if obj.kind == "part":
                assert ann["parent_id"] == img["id"] * 1000 + obj.parent and ann["granularity"] == "part"
            if obj.kind == "person":
                assert len(ann["keypoints"]) == 51
    cats = {c["name"]: c for c in coco.loadCats(coco.getCatIds())}
    assert cats["person"]["keypoints"][0] == "nose" and cats["head"]["granularity"] == "part"


def test_panoptic_round_trip(dataset):
    seen = 0
    for ann, seg in readers.read_panoptic(dataset / "panoptic.json", dataset / "panoptic"):
        ids = set(np.unique(seg).tolist())
        assert ids == {s["id"] for s in ann["segments_info"]}  # every pixel belongs to exactly one segment
        for info in ann["segments_info"]:
            assert int((seg == info["id"]).sum()) == info["area"]
        seen += 1
    assert seen == 6


def test_humanref_and_refs_round_trip(dataset):
    samples = readers.read_humanref(dataset / "humanref.jsonl")
    assert samples and {s.domain for s in samples} >= {"property", "position", "rejection"}
    for s in samples:
        assert len(s.answer_boxes) == len(s.answer_segmentations)
        assert s.is_rejection == (s.domain == "rejection")
        for box, rle in zip(s.answer_boxes, s.answer_segmentations, strict=True):
            ys, xs = np.nonzero(rle_to_mask(rle))
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box
            assert box in s.candidate_boxes
    refs = readers.read_refs(dataset / "refs.json")
    assert refs and all(r["sentences"] and r["split"] in ("train", "val", "test") for r in refs)
    lang = readers.read_language(dataset / "language.jsonl")
    types = {r["type"] for r in lang}
    assert types == {"caption_brief", "caption_detailed", "region_caption", "count", "region_qa", "visual_prompt"}


def test_nonempty_folder_is_refused_and_nothing_partial_is_left(tmp_path, monkeypatch):
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export.write_dataset(out, 2, config=CFG, progress=False)
    assert (out / "keep.txt").read_text() == "mine"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "refcoco_refs", boom)
    with pytest.raises(KeyboardInterrupt):
        export.write_dataset(tmp_path / "fresh", 2, config=CFG, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / "old.txt").write_text("x")
    export.write_dataset(out, 1, config=CFG, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "instances.json").exists()


def test_readers_name_the_bad_line_and_field(tmp_path):
    p = tmp_path / "h.jsonl"
    p.write_text(
        json.dumps(
            {
                "id": 1,
                "image_name": "a.png",
                "referring": "x",
                "candidate_boxes": [],
                "answer_boxes": [[5, 5, 1, 1]],
                "domain": "property",
            }
        )
        + "\n"
    )
    with pytest.raises(readers.FormatError, match=r"h.jsonl:1: answer_boxes\[0\]"):
        readers.read_humanref(p)
    p.write_text('{"id": 1}\n')
    with pytest.raises(readers.FormatError, match="missing field 'image_name'"):
        readers.read_humanref(p)
    p.write_text("not json\n")
    with pytest.raises(readers.FormatError, match=r"h\.jsonl:1"):
        readers.read_humanref(p)
    with pytest.raises(readers.FormatError, match="pickle"):
        readers.read_refs(tmp_path / "refs(unc).p")
    with pytest.raises(FileNotFoundError):
        readers.read_humanref(tmp_path / "missing.jsonl")


def _cli(*args):
    return run_cli(*args)


def test_cli_generate_and_errors(tmp_path):
    r = _cli("world", "generate", "--n", "2", "--out", str(tmp_path / "d"), "--size", "96", "--quiet")
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "d" / "images").iterdir())) == 2
    for bad in (["--n", "-1"], ["--n", "2", "--size", "7"], ["--n", "2", "--min-objects", "4", "--max-objects", "2"]):
        r = _cli("world", "generate", "--out", str(tmp_path / "e"), *bad)
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "e").exists()
    r = _cli("world", "generate", "--n", "1", "--out", str(tmp_path / "d"))
    assert r.returncode == 1 and "not empty" in r.stderr
