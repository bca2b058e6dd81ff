"""The readers of the field's annotation files (``perceive.data.sources``): small files in each format, quirks
included, read into records that pose the tasks they should and no others."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from perceive.boxes import mask_to_rle, mask_to_uncompressed_rle, rle_to_mask
from perceive.data.readers import FormatError
from perceive.data.sources.coco import CocoSource, LvisSource
from perceive.data.sources.humanref import HumanRefSource
from perceive.data.sources.jsonl import JsonlSource
from perceive.data.sources.panoptic import PanopticSource
from perceive.data.sources.refcoco import RefcocoSource
from perceive.data.sources.world import WORLD_NEGATIVES, scene_record, world_schema
from perceive.data.sources.world_folder import WorldFolderSource
from perceive.data.tasks import feeds, make_qa
from perceive.world import export
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe


def write_image(path, width, height, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(width * height)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 255, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)
    return path


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def questions(record, task, n=60):
    """The QA pairs of ``task`` that ``make_qa`` poses on ``record`` with every instance's true box given."""
    box_objects = [i.id for i in record.instances if not i.iscrowd]
    out = [make_qa(task, record, box_objects, random.Random(seed)) for seed in range(n)]
    return [qa for qa in out if qa is not None]


def detected(record, n=80):
    """Every category a detection question on ``record`` names."""
    return {name for qa in questions(record, "detect", n) for name in qa.phrases}


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

SQUARE = np.zeros((48, 64), dtype=bool)
SQUARE[10:20, 30:40] = True


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    write_image(images / "rgb.jpg", 64, 48)
    write_image(images / "gray.png", 64, 48, "L")
    write_image(images / "rgba.png", 40, 30, "RGBA")
    keypoints = [0.0] * 51
    keypoints[0:3], keypoints[3:6] = [12, 14, 2], [13, 13, 1]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [1, 2, 10, 12], "iscrowd": 0,
         "segmentation": [[1, 2, 11, 2, 11, 14, 1, 14], [5, 5, 6, 6]]},  # a ring of two points, as in COCO
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [30, 10, 10, 10], "iscrowd": 0,
         "segmentation": mask_to_rle(SQUARE)},
        {"id": 3, "image_id": 10, "category_id": 12, "bbox": [0, 20, 64, 28], "iscrowd": 1,
         "segmentation": mask_to_uncompressed_rle(SQUARE)},
        {"id": 4, "image_id": 20, "category_id": 12, "bbox": [8, 8, 20, 30], "num_keypoints": 2,
         "keypoints": keypoints, "attributes": {"color": "red", "pose": "standing", "holding": 7}},
        {"id": 5, "image_id": 20, "category_id": 3, "bbox": [50, 40, 30, 30], "attributes": {"color": "blue"}},
        {"id": 6, "image_id": 20, "category_id": 7, "bbox": [70, 10, 5, 5]},  # wholly outside the image
        {"id": 7, "image_id": 99, "category_id": 3, "bbox": [1, 1, 5, 5]},  # an image the file does not have
        {"id": 8, "image_id": 10, "category_id": 5, "bbox": [1, 1, 5, 5]},  # a category the file does not have
        {"id": 9, "image_id": 40, "category_id": 3, "bbox": [1, 1, 5, 5]},  # its image is missing on disk
        {"id": 10, "image_id": 30, "category_id": 12, "bbox": [20, 5, -4, 10]},  # x1 < x0
    ]  # fmt: skip
    data = {
        "images": [{"id": 10, "file_name": "rgb.jpg", "width": 64, "height": 48},
                   {"id": 20, "file_name": "gray.png", "width": 64, "height": 48},
                   {"id": 30, "file_name": "rgba.png", "width": 40, "height": 30},
                   {"id": 40, "file_name": "gone.jpg", "width": 64, "height": 48}],
        "annotations": anns,
        # non-contiguous ids, not in id order
        "categories": [{"id": 12, "name": "person"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
    }  # fmt: skip
    return write_json(tmp_path / "instances.json", data), images


def test_coco_records_keep_the_file_as_it_is(coco):
    path, images = coco
    source = CocoSource(path, images)
    assert len(source) == 3 and source.name == "coco"
    assert source.schema.values == {"category": ["dog", "cat", "person"], "color": ["blue", "red"],
                                    "pose": ["standing"]}  # fmt: skip
    first = source.record(0)
    assert (first.key, first.width, first.height, first.path) == ("10", 64, 48, images / "rgb.jpg")
    assert [(i.id, i.category, i.box, i.iscrowd) for i in first.instances] == [
        (1, "dog", [1.0, 2.0, 11.0, 14.0], False), (2, "cat", [30.0, 10.0, 40.0, 20.0], False),
        (3, "person", [0.0, 20.0, 64.0, 48.0], True)]  # fmt: skip
    polygon, compressed, uncompressed = (i.mask for i in first.instances)
    assert polygon == [[1, 2, 11, 2, 11, 14, 1, 14]]  # the degenerate ring dropped, the rest as in the file
    assert compressed == mask_to_rle(SQUARE) and uncompressed == mask_to_uncompressed_rle(SQUARE)
    assert (rle_to_mask(compressed) == SQUARE).all() and (rle_to_mask(uncompressed) == SQUARE).all()
    # a crowd is never a target: no region text, not counted (its category's count is unknowable)
    assert [r.object for r in first.regions] == [1, 2] and [r.category for r in first.regions] == ["dog", "cat"]
    assert [(q.question, q.answer, q.answer_objects) for q in first.questions] == [
        ("How many cat are there?", "1", [2]), ("How many dog are there?", "1", [1])]  # fmt: skip
    assert first.negative_categories == ["dog", "cat", "person"]


def test_coco_keypoints_attributes_clipping_and_modes(coco):
    path, images = coco
    source = CocoSource(path, images)
    second = source.record(1)
    person, dog = second.instances
    assert person.keypoints is not None and len(person.keypoints) == 17
    assert person.keypoints[0] == [12.0, 14.0, 2] and person.keypoints[2] == [0.0, 0.0, 0]
    assert person.attributes == {"color": "red", "pose": "standing"}  # strings only
    assert dog.box == [50.0, 40.0, 64.0, 48.0] and dog.keypoints is None  # clipped to the image
    # the cat wholly outside the image was skipped: it is not taught absent there
    assert "cat" not in second.negative_categories
    third = source.record(2)
    assert third.instances == [] and third.negative_categories == ["dog", "cat"]  # its person's box was bad
    for record in (second, third):  # grayscale and RGBA files decode to RGB
        assert record.image().shape == (record.height, record.width, 3)


def test_coco_skips_bad_annotations_and_names_them(coco):
    path, images = coco
    source = CocoSource(path, images)
    assert source.skipped.counts == {"missing image": 1, "box outside the image": 1, "unknown image": 1,
                                     "unknown category": 1, "box with x1 < x0 or y1 < y0": 1}  # fmt: skip
    summary = source.skipped.summary()
    assert summary.startswith("skipped 5") and "gone.jpg" in summary and str(path) in summary
    with pytest.raises(FormatError, match=r"images\[3\].*missing image"):
        CocoSource(path, images, strict=True)


def test_coco_detection_names_only_what_the_image_lacks(coco):
    path, images = coco
    source = CocoSource(path, images)
    first, second = source.record(0), source.record(1)
    assert detected(first) == {"dog", "cat"}  # present ones; the crowd's person is never named absent
    assert "cat" not in detected(second)  # neither present nor known absent
    assert {"count", "detect", "region_category"} <= set(feeds(first)) and "refer" not in feeds(first)
    assert feeds(source.record(2)) == []


def test_a_file_of_the_wrong_kind_is_refused_in_one_line(tmp_path, coco):
    path, images = coco
    humanref = write_lines(tmp_path / "h.jsonl", [{"image_name": "a.png", "referring": "x", "candidate_boxes": []}] * 2)
    with pytest.raises(FormatError, match=r"h\.jsonl: a JSON Lines file, not a COCO instances JSON"):
        CocoSource(humanref, images)
    with pytest.raises(FormatError, match=r"refs\.json: not a COCO instances JSON.*RefCOCO refs"):
        CocoSource(write_json(tmp_path / "refs.json", [{"ref_id": 1}]), images)
    with pytest.raises(FormatError, match=r"instances\.json: not RefCOCO refs"):
        RefcocoSource(path, path, images)
    with pytest.raises(FormatError, match=r"instances\.json: one JSON document, not JSON Lines; expected HumanRef"):
        HumanRefSource(write_json(tmp_path / "instances.json", json.loads(path.read_text()) | {"x": 0}), images)
    (tmp_path / "pretty.json").write_text(json.dumps({"images": []}, indent=2))
    with pytest.raises(FormatError, match=r"pretty\.json: one JSON document, not JSON Lines; expected a JSON Lines"):
        JsonlSource(tmp_path / "pretty.json")
    with pytest.raises(FormatError, match=r"not a COCO panoptic JSON.*use format 'coco'"):
        PanopticSource(path, tmp_path, images)
    with pytest.raises(FormatError, match="empty category list"):
        CocoSource(write_json(tmp_path / "e.json", {"images": [], "annotations": [], "categories": []}), images,
                   strict=True)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# LVIS
# ---------------------------------------------------------------------------------------------


def test_lvis_teaches_absent_only_what_is_verified_absent(tmp_path):
    images = tmp_path / "coco"
    write_image(images / "val2017" / "000000000001.jpg", 64, 48)
    write_image(images / "000000000002.jpg", 64, 48)  # an image folder without COCO's split folders
    cats = [{"id": 1, "name": "teddy_bear"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "cat"},
            {"id": 4, "name": "bird"}, {"id": 5, "name": "bus"}]  # fmt: skip
    url = "http://images.cocodataset.org/{}/{:012d}.jpg"
    data = {
        "images": [{"id": 1, "coco_url": url.format("val2017", 1), "width": 64, "height": 48,
                    "neg_category_ids": [3, 4, 77], "not_exhaustive_category_ids": [2]},
                   {"id": 2, "coco_url": url.format("train2017", 2), "width": 64, "height": 48,
                    "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]},
                        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 1, 10, 10]},
                        {"id": 3, "image_id": 2, "category_id": 5, "bbox": [20, 1, 10, 10]}],
        "categories": cats,
    }  # fmt: skip
    source = LvisSource(write_json(tmp_path / "lvis.json", data), images)
    assert source.schema.values["category"] == ["teddy bear", "dog", "cat", "bird", "bus"]
    first, second = source.record(0), source.record(1)
    assert first.path == images / "val2017" / "000000000001.jpg" and second.path == images / "000000000002.jpg"
    assert first.negative_categories == ["cat", "bird"]
    # the dog is not exhaustively labelled: never counted, never absent
    assert [q.question for q in first.questions] == ["How many teddy bear are there?"]
    assert detected(first, 200) <= {"teddy bear", "dog", "cat", "bird"}
    assert {"cat", "bird"} <= detected(first, 200)
    assert detected(second) == {"bus"} and second.negative_categories == []
    assert source.skipped.counts == {"unknown category in neg_category_ids": 1}


# ---------------------------------------------------------------------------------------------
# COCO panoptic
# ---------------------------------------------------------------------------------------------


def test_panoptic_things_are_instances_and_stuff_is_never_an_object(tmp_path):
    write_image(tmp_path / "images" / "a.jpg", 32, 24)
    ids = np.full((24, 32), 1000, dtype=np.int64)  # sky everywhere
    ids[2:10, 3:12] = 5  # a dog
    ids[12:20, 20:30] = 6  # a crowd of persons
    (tmp_path / "png").mkdir()
    Image.fromarray(np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)).save(
        tmp_path / "png" / "a.png"
    )
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24},
                   {"id": 2, "file_name": "b.jpg", "width": 32, "height": 24}],
        "annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": [
                            {"id": 5, "category_id": 18, "bbox": [3, 2, 9, 8], "iscrowd": 0},
                            {"id": 6, "category_id": 1, "bbox": [20, 12, 10, 8], "iscrowd": 1},
                            {"id": 1000, "category_id": 187, "bbox": [0, 0, 32, 24], "iscrowd": 0},
                            {"id": 7, "category_id": 99, "bbox": [0, 0, 1, 1], "iscrowd": 0}]},
                        {"image_id": 2, "file_name": "b.png", "segments_info": []}],
        "categories": [{"id": 1, "name": "person", "isthing": 1}, {"id": 18, "name": "dog", "isthing": 1},
                       {"id": 187, "name": "sky", "isthing": 0}],
    }  # fmt: skip
    source = PanopticSource(write_json(tmp_path / "panoptic.json", data), tmp_path / "png", tmp_path / "images")
    assert len(source) == 1 and source.schema.values == {"category": ["person", "dog"]}
    assert source.skipped.counts == {"missing image": 1, "unknown category": 1}
    record = source.record(0)
    dog, crowd, sky = record.instances
    assert (dog.category, dog.box, dog.iscrowd, dog.attributes) == ("dog", [3.0, 2.0, 12.0, 10.0], False, {})
    assert crowd.iscrowd and sky.iscrowd and sky.attributes == {"stuff": "yes"}
    for inst, sid in ((dog, 5), (crowd, 6), (sky, 1000)):
        assert (rle_to_mask(inst.mask) == (ids == sid)).all()
    assert [q.question for q in record.questions] == ["How many dog are there?"]
    assert [r.object for r in record.regions] == [5] and record.negative_categories == ["person", "dog"]
    assert detected(record) == {"dog"}  # neither the crowd's person nor the sky


# ---------------------------------------------------------------------------------------------
# RefCOCO and gRefCOCO
# ---------------------------------------------------------------------------------------------


def sentences(*texts):
    return [{"sent_id": k, "sent": t, "raw": t, "tokens": t.split()} for k, t in enumerate(texts)]


def test_refcoco_refs_become_expressions(tmp_path, coco):
    instances, images = coco
    refs = [
        {"ref_id": 1, "ann_id": 1, "image_id": 10, "split": "train",
         "sentences": sentences("dog on left", "brown dog")},
        {"ref_id": 2, "ann_id": 2, "image_id": 10, "split": "val", "sentences": sentences("the cat")},
        {"ref_id": 3, "ann_id": [-1], "no_target": True, "image_id": 10, "split": "train",
         "sentences": sentences("the horse")},
        {"ref_id": 4, "ann_id": [1, 2], "no_target": False, "image_id": 10, "split": "train",
         "sentences": sentences("both animals")},
        {"ref_id": 5, "ann_id": 999, "image_id": 10, "split": "train", "sentences": sentences("ghost")},
        {"ref_id": 6, "ann_id": 3, "image_id": 10, "split": "train", "sentences": sentences("the crowd")},
    ]  # fmt: skip
    path = write_json(tmp_path / "refs.json", refs)
    source = RefcocoSource(path, instances, images, split="train")
    assert len(source) == 1
    record = source.record(0)
    assert [(e.text, e.answer, e.domain) for e in record.expressions] == [
        ("dog on left", [1], ""), ("brown dog", [1], ""), ("the horse", [], "rejection"),
        ("both animals", [1, 2], "")]  # fmt: skip
    assert [(r.object, r.referring, r.category) for r in record.regions] == [(1, "dog on left", "")]
    assert record.questions == [] and record.negative_categories == []
    assert source.skipped.counts["ref naming an unknown annotation"] == 1
    assert source.skipped.counts["ref answered by a crowd region"] == 1
    referring = questions(record, "refer")
    assert referring and all(set(qa.phrases) <= {e.text for e in record.expressions} for qa in referring)
    horse = [g for qa in referring for p, g in zip(qa.phrases, qa.groups, strict=True) if p == "the horse"]
    assert horse and all(g == [] for g in horse)  # a rejection answers with no object
    assert len(RefcocoSource(path, instances, images)) == 1  # every split
    with pytest.raises(FormatError, match=r"no refs of split 'testB'; its splits are \['train', 'val'\]"):
        RefcocoSource(path, instances, images, split="testB")
    with pytest.raises(FormatError, match=r"gone\.jpg: missing image"):  # the instances' first bad entry
        RefcocoSource(path, instances, images, split="train", strict=True)


def test_refcoco_pickles_are_never_unpickled(tmp_path, coco):
    instances, images = coco
    pickled = tmp_path / "refs(unc).p"
    pickled.write_bytes(b"\x80\x04crm -rf\n.")
    with pytest.raises(FormatError, match=r"refs\(unc\)\.p: a pickle.*refer toolkit's environment"):
        RefcocoSource(pickled, instances, images)
    renamed = tmp_path / "refs.json"
    renamed.write_bytes(pickled.read_bytes())
    with pytest.raises(FormatError, match="a pickle, which is never loaded"):
        RefcocoSource(renamed, instances, images)


# ---------------------------------------------------------------------------------------------
# HumanRef
# ---------------------------------------------------------------------------------------------


def test_humanref_expressions_with_several_or_no_answers(tmp_path):
    write_image(tmp_path / "images" / "a.png", 64, 48)
    people = [[1, 1, 20, 40], [30, 2, 50, 44]]
    base = {"image_name": "a.png", "candidate_boxes": people, "sub_domain": "attribute", "domain": "property"}
    lines = [
        {**base, "id": 1, "referring": "the man in red", "answer_boxes": [people[1]]},
        {**base, "id": 2, "referring": "the people", "answer_boxes": [[1, 1, 20, 40.05], people[1]]},  # IoU > 0.99
        {**base, "id": 3, "referring": "the dancer", "answer_boxes": [], "domain": "rejection", "sub_domain": ""},
        {**base, "id": 4, "referring": "the child", "answer_boxes": [[5, 5, 9, 9]]},  # not a candidate
        '{"id": 5, "image_name": "a.png", "referring": ',  # cut short
        {**base, "id": 6, "image_name": "gone.png", "referring": "anyone", "answer_boxes": []},
        {**base, "id": 7, "referring": "the giant", "answer_boxes": [], "candidate_boxes": [[70, 1, 90, 40]]},
    ]
    path = write_lines(tmp_path / "humanref.jsonl", lines)
    source = HumanRefSource(path, tmp_path / "images")
    assert len(source) == 1 and source.kinds == ("property/attribute", "rejection/")
    assert source.skipped.counts == {"answer not among its candidates": 1, "malformed line": 1, "missing image": 1,
                                     "box outside the image": 1}  # fmt: skip
    assert f"{path}:4" in source.skipped.summary()
    record = source.record(0)
    assert (record.width, record.height) == (64, 48)  # read from the image's header
    assert [(i.id, i.box, i.category) for i in record.instances] == [(0, [1.0, 1.0, 20.0, 40.0], "person"),
                                                                    (1, [30.0, 2.0, 50.0, 44.0], "person")]  # fmt: skip
    assert [(e.text, e.answer, e.kind) for e in record.expressions] == [
        ("the man in red", [1], "property/attribute"), ("the people", [0, 1], "property/attribute"),
        ("the dancer", [], "rejection/")]  # fmt: skip
    assert feeds(record) == ["detect", "refer"]
    with pytest.raises(
        FormatError, match=r"humanref\.jsonl:4: answer \[5.0, 5.0, 9.0, 9.0\]: answer not among its candidates"
    ):
        HumanRefSource(path, tmp_path / "images", strict=True)


# ---------------------------------------------------------------------------------------------
# one's own data
# ---------------------------------------------------------------------------------------------


def test_own_jsonl(tmp_path):
    write_image(tmp_path / "photos" / "a.png", 40, 30)
    write_image(tmp_path / "photos" / "b.png", 40, 30, "L")
    square = np.zeros((30, 40), dtype=bool)
    square[2:8, 3:9] = True
    lines = [
        {"image": "photos/a.png", "boxes": [[3, 2, 9, 8], [20, 10, 30, 25], [35, 20, 60, 40]],
         "labels": ["cup", "plate", "cup"], "masks": [mask_to_rle(square), [[20, 10, 30, 10, 30, 25]], None],
         "expressions": [{"text": "the cup on the left", "boxes": [0]}, {"text": "the cups", "boxes": [0, 2]},
                         {"text": "the spoon"}]},
        "not json",
        {"image": "photos/b.png", "boxes": [[1, 1, 5, 5], [50, 50, 60, 60]], "labels": ["fork", "cup"],
         "expressions": [{"text": "the cup", "boxes": [1]}], "width": 40, "height": 30},
        {"image": "photos/b.png", "boxes": [], "labels": []},
        {"image": "photos/c.png", "boxes": [], "labels": []},
        {"image": "photos/a.png", "boxes": [[1, 1, 2, 2]], "labels": []},
    ]  # fmt: skip
    path = write_lines(tmp_path / "mine.jsonl", lines)
    source = JsonlSource(path)
    assert len(source) == 2 and source.schema.values == {"category": ["cup", "fork", "plate"]}
    assert source.skipped.counts == {"malformed line": 1, "box outside the image": 1,
                                     "expression naming a skipped box": 1, "duplicate image": 1,
                                     "missing image": 1, "empty category list": 1}  # fmt: skip
    a, b = source.record(0), source.record(1)
    assert (a.key, a.path, a.width, a.height) == ("photos/a.png", tmp_path / "photos/a.png", 40, 30)
    assert [(i.id, i.category, i.box) for i in a.instances] == [
        (0, "cup", [3.0, 2.0, 9.0, 8.0]), (1, "plate", [20.0, 10.0, 30.0, 25.0]),
        (2, "cup", [35.0, 20.0, 40.0, 30.0])]  # fmt: skip
    assert a.instances[0].mask == mask_to_rle(square) and a.instances[2].mask is None
    assert [(e.text, e.answer) for e in a.expressions] == [("the cup on the left", [0]), ("the cups", [0, 2]),
                                                           ("the spoon", [])]  # fmt: skip
    assert [(q.question, q.answer) for q in a.questions] == [("How many cup are there?", "2"),
                                                             ("How many plate are there?", "1")]  # fmt: skip
    assert a.negative_categories == ["cup", "fork", "plate"]
    # b's cup was outside the image: its expression is gone and "cup" is neither absent nor counted there
    assert [i.category for i in b.instances] == ["fork"] and b.expressions == []
    assert b.negative_categories == ["fork", "plate"]
    assert [q.question for q in b.questions] == ["How many fork are there?"]
    assert detected(b) <= {"fork", "plate"}
    assert set(feeds(a)) >= {"detect", "refer", "count", "region_category"}
    partial = JsonlSource(path, exhaustive=False).record(0)
    assert partial.negative_categories == [] and partial.questions == []
    with pytest.raises(FormatError, match=r"mine\.jsonl:2: not JSON: malformed line"):
        JsonlSource(path, strict=True)


# ---------------------------------------------------------------------------------------------
# a world export folder
# ---------------------------------------------------------------------------------------------


def test_world_folder_records_are_the_streams(tmp_path):
    cfg = WorldConfig(size=128, person_share=0.5)
    folder = export.write_dataset(tmp_path / "world", 5, seed=4, config=cfg, progress=False)
    source = WorldFolderSource(folder)
    assert len(source) == 5 and source.skipped.total == 0
    assert source.schema == world_schema()
    for index in range(5):
        scene = generate_scene(export.scene_seed(4, index), cfg)
        want, got = scene_record(scene, describe(scene, cfg)), source.record(index)
        assert len(got.instances) == len(want.instances)
        ids = {g.id: w.id for g, w in zip(got.instances, want.instances, strict=True)}  # ids through the order

        def mapped(objects, ids=ids):
            return [ids[o] for o in objects]

        for g, w in zip(got.instances, want.instances, strict=True):
            assert (g.box, g.category, g.granularity, g.mask is not None, g.keypoints, g.attributes, g.iscrowd) == (
                w.box, w.category, w.granularity, True, w.keypoints, w.attributes, w.iscrowd)  # fmt: skip
            assert (ids[g.parent] if g.parent is not None else None) == w.parent
            assert (rle_to_mask(g.mask) == scene.mask(w.id)).all()
        assert [(e.text, mapped(e.answer), e.domain, e.sub_domain, e.program) for e in got.expressions] == [
            (e.text, e.answer, e.domain, e.sub_domain, e.program) for e in want.expressions]  # fmt: skip
        assert all(e.anchor is None for e in got.expressions)  # the scene is not in the files
        assert [(c.kind, c.text, [(p.phrase, p.span, mapped(p.objects)) for p in c.phrases]) for c in got.captions] == [
            (c.kind, c.text, [(p.phrase, p.span, p.objects) for p in c.phrases]) for c in want.captions]  # fmt: skip
        assert [(ids[r.object], r.category, r.short_phrase, r.brief, r.referring) for r in got.regions] == [
            (r.object, r.category, r.short_phrase, r.brief, r.referring) for r in want.regions]  # fmt: skip
        assert [(q.kind, q.question, q.answer, mapped(q.objects), mapped(q.answer_objects)) for q in got.questions] == [
            (q.kind, q.question, q.answer, q.objects, q.answer_objects) for q in want.questions]  # fmt: skip
        assert [(ids[p.object], p.kind, p.point, p.box, p.scribble, p.mask, p.question, p.answer)
                for p in got.prompts] == [(p.object, p.kind, p.point, p.box, p.scribble, p.mask, p.question, p.answer)
                                          for p in want.prompts]  # fmt: skip
        assert (got.key, got.width, got.height) == (want.key, want.width, want.height)
        assert got.negative_categories == list(WORLD_NEGATIVES) == want.negative_categories
        assert np.array_equal(got.image(), scene.image)  # PNG is lossless
        assert feeds(got) == feeds(want)


def test_own_jsonl_region_texts_and_grounded_captions(tmp_path):
    write_image(tmp_path / "a.png", 40, 30)
    caption = "a cup and a plate on a table"
    lines = [
        {"image": "a.png", "boxes": [[3, 2, 9, 8], [20, 10, 30, 25], [50, 50, 60, 60]],
         "labels": ["cup", "plate", "cup"],
         "regions": [{"category": "mug", "short_phrase": "a red mug", "referring": "the mug on the left"}, None,
                     {"category": "cup"}],
         "captions": [{"text": caption, "phrases": [{"span": [0, 5], "boxes": [0]}, {"span": [10, 17], "boxes": [1]},
                                                     {"span": [18, 20], "boxes": [2]}, {"span": [3, 99]}]}]},
        {"image": "a.png", "boxes": [], "labels": [], "regions": "no"},
    ]  # fmt: skip
    source = JsonlSource(write_lines(tmp_path / "mine.jsonl", lines), exhaustive=False)
    assert source.skipped.counts == {"box outside the image": 1, "caption phrase naming a missing or skipped box": 1,
                                     "malformed caption phrase": 1, "malformed line": 1}  # fmt: skip
    record = source.record(0)
    assert [(r.object, r.category, r.short_phrase, r.brief, r.referring) for r in record.regions] == [
        (0, "mug", "a red mug", "", "the mug on the left"), (1, "plate", "", "", "")]  # fmt: skip
    [cap] = record.captions
    assert (cap.kind, cap.text) == ("caption_brief", caption)
    assert [(p.phrase, p.span, p.objects) for p in cap.phrases] == [("a cup", (0, 5), [0]), ("a plate", (10, 17), [1])]
    assert {"caption_brief", "region_phrase", "region_sentence"} <= set(feeds(record))
