"""Data specs (``perceive.data.spec``): a folder or a JSON/YAML list of sources, read into sources with weights,
merged schemas, a start-up summary, and a deterministic weighted stream of records that feed a task."""

import json
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from perceive.data.readers import FormatError
from perceive.data.spec import DataSpec, MixedRecords, load_spec
from perceive.data.tasks import feeds
from perceive.world import export
from perceive.world.generator import WorldConfig


@pytest.fixture
def files(tmp_path):
    """A COCO file (one image with objects, one without), HumanRef lines and an own-data JSONL over them."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(images / name)
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
                   {"id": 3, "file_name": "gone.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 1, 10, 10],
                         "attributes": {"color": "red"}},
                        {"id": 2, "image_id": 1, "category_id": 4, "bbox": [20, 1, 10, 10],
                         "attributes": {"color": "blue"}}],
        "categories": [{"id": 4, "name": "cup"}, {"id": 9, "name": "person"}],
    }  # fmt: skip
    (tmp_path / "data" / "instances.json").write_text(json.dumps(coco))
    line = {"image_name": "a.png", "candidate_boxes": [[1, 1, 11, 11]], "answer_boxes": [[1, 1, 11, 11]],
            "domain": "property", "sub_domain": "attribute", "referring": "the man"}  # fmt: skip
    (tmp_path / "data" / "humanref.jsonl").write_text(json.dumps(line) + "\n")
    own = {"image": "c.png", "boxes": [[2, 2, 9, 9]], "labels": ["plate"]}
    (tmp_path / "data" / "mine.jsonl").write_text(json.dumps(own) + "\n")
    return tmp_path


def spec_of(root, sources, name="spec.json"):
    path = root / name
    path.write_text(json.dumps({"sources": sources}))
    return path


SOURCES = [
    {"format": "coco", "annotations": "data/instances.json", "images": "data/images", "weight": 3},
    {"format": "humanref", "annotations": "data/humanref.jsonl", "images": "data/images"},
    {"format": "jsonl", "annotations": "data/mine.jsonl", "images": "data/images", "exhaustive": False},
]


def test_a_spec_file_lists_sources_with_weights_and_paths_relative_to_it(files):
    spec = load_spec(spec_of(files, SOURCES))
    assert [s.name for s in spec.sources] == ["coco", "humanref", "jsonl"] and spec.weights == [3.0, 1.0, 1.0]
    schema = spec.schema()
    assert schema.values == {"category": ["cup", "person", "plate"], "color": ["blue", "red"]}
    assert spec.kinds() == ("property/attribute",)
    lines = spec.summary().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("source 0: coco ") and "instances.json (weight 3): 2 records" in lines[0]
    assert "feeds detect, region_category, count" in lines[0] and "1 missing image" in lines[0]
    assert "feeds detect, refer;" in lines[1] and lines[1].endswith("nothing skipped")
    assert "1 records; feeds detect, region_category;" in lines[2]


def test_a_yaml_spec_is_the_json_spec(files):
    yaml_text = "sources:\n" + "".join(f"  - {json.dumps(s)}\n" for s in SOURCES)  # JSON is YAML's flow style
    (files / "spec.yaml").write_text(yaml_text)
    spec = load_spec(files / "spec.yaml")
    assert [len(s) for s in spec.sources] == [2, 1, 1] and spec.weights == [3.0, 1.0, 1.0]


def test_yaml_without_pyyaml_says_what_to_do(files, monkeypatch):
    (files / "spec.yml").write_text("sources: []\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    with pytest.raises(FormatError, match=r"spec\.yml: a YAML spec needs PyYAML \(pip install pyyaml\)"):
        load_spec(files / "spec.yml")


def test_mixed_records_are_deterministic_weighted_and_feed_a_task(files):
    spec = load_spec(spec_of(files, SOURCES))
    stream = MixedRecords(spec)
    assert stream.schema == spec.schema() and stream.kinds == ("property/attribute",)
    draws = [stream.record_for(7, i) for i in range(400)]
    again = MixedRecords(load_spec(spec_of(files, SOURCES)))
    assert [(r.source, r.key) for r in draws] == [(again.record_for(7, i).source, again.record_for(7, i).key)
                                                  for i in range(400)]  # fmt: skip
    assert [r.key for r in draws[:20]] != [stream.record_for(8, i).key for i in range(20)]
    shares = Counter(r.source for r in draws)
    assert 0.5 < shares[0] / 400 < 0.7 and 0.12 < shares[1] / 400 < 0.28  # weights 3 : 1 : 1
    # COCO's image b has no instance and feeds no task: never drawn
    assert {r.key for r in draws if r.source == 0} == {"1"}
    assert all(feeds(r) for r in draws)


def test_a_world_export_folder_is_a_spec(tmp_path):
    folder = export.write_dataset(tmp_path / "world", 3, seed=1, config=WorldConfig(size=96), progress=False)
    spec = load_spec(folder)
    assert [s.name for s in spec.sources] == ["world"] and len(spec.sources[0]) == 3
    stream = MixedRecords(spec)
    assert stream.kinds is not None and "rejection/property" in stream.kinds
    assert stream.record_for(0, 0).key.startswith("world_")
    nested = load_spec(spec_of(tmp_path, [{"format": "world", "path": "world", "weight": 2}]))
    assert len(nested.sources[0]) == 3 and nested.weights == [2.0]
    (tmp_path / "plain").mkdir()
    with pytest.raises(FormatError, match=r"plain: a folder that is not a world export \(it has no world\.json\)"):
        load_spec(tmp_path / "plain")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"format": "voc", "annotations": "x"}, r"sources\[1\]: unknown format 'voc'; known: coco, lvis"),
        ({"format": "coco", "images": "data/images"}, r"sources\[1\] \(coco\): missing annotations"),
        ({"format": "refcoco", "refs": "r.json", "images": "i"}, r"sources\[1\] \(refcoco\): missing instances"),
        ({"format": "coco", "annotations": "a", "images": "i", "wieght": 2}, r"unknown keys \['wieght'\]"),
        ({"format": "coco", "annotations": "a", "images": "i", "weight": 0}, "weight must be a positive number"),
        (
            {"format": "humanref", "annotations": "data/instances.json", "images": "data/images"},
            r"instances\.json: one JSON document, not JSON Lines; expected HumanRef JSONL",
        ),
    ],
)
def test_a_bad_source_is_named_in_one_line(files, entry, message):
    path = spec_of(files, [SOURCES[0], entry])
    with pytest.raises(FormatError, match=message) as caught:
        load_spec(path)
    assert "\n" not in str(caught.value)
    if "sources[" in message:
        assert str(caught.value).startswith(str(path))


def test_bad_spec_files_and_strict(files):
    (files / "cut.json").write_text('{"sources": [')
    with pytest.raises(FormatError, match=r"cut\.json: not valid JSON"):
        load_spec(files / "cut.json")
    with pytest.raises(FormatError, match="non-empty list of 'sources'"):
        load_spec(spec_of(files, []))
    with pytest.raises(FormatError, match="no such data spec"):
        load_spec(files / "nowhere.json")
    with pytest.raises(FormatError, match=r"gone\.png: missing image"):
        load_spec(spec_of(files, SOURCES), strict=True)


def test_a_source_with_no_records_is_refused_by_the_stream(files):
    empty = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cup"}]}
    (files / "data" / "empty.json").write_text(json.dumps(empty))
    spec = load_spec(spec_of(files, [{"format": "coco", "annotations": "data/empty.json", "images": "data/images"}]))
    with pytest.raises(ValueError, match=r"source 0 \(coco .*empty\.json\) has no records"):
        MixedRecords(spec)
    with pytest.raises(ValueError, match="a positive weight per source"):
        MixedRecords(DataSpec(spec.sources, [1.0, 1.0]))
