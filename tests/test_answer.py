"""perceive.answer: the one answer type of every model (JSON, COCO results, pictures, supervision)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from perceive.answer import Answer, GroundedObject
from perceive.boxes import mask_to_rle, rle_to_mask
from perceive.draw import MASK_ALPHA, phrase_colors
from perceive.keypoints import COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON

H, W = 64, 96  # input images; draw enlarges them 4x (384 / 96)
SCALE = 4


def _rect_mask(y0: int, y1: int, x0: int, x1: int, h: int = H, w: int = W) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _person_keypoints() -> list[list[float]]:
    """17 [x, y, v] inside the person's box [20, 8, 60, 60]; two ears absent, one hip occluded."""
    kps = [[24.0 + 2 * i, 10.0 + 2.5 * i, 2] for i in range(len(COCO_PERSON_KEYPOINTS))]
    kps[3][2] = kps[4][2] = 0
    kps[11][2] = 1
    return [[float(x), float(y), int(v)] for x, y, v in kps]


def _retrieval_answer() -> Answer:
    return Answer(
        text="<ground>cat</ground><objects><obj0><obj2></objects>",
        objects=[
            GroundedObject("cat", [10.123, 20.456, 30.789, 40.0], 0.876543, index=0),
            GroundedObject("cat", [np.float32(50.5), 5.0, 70.25, 30.1], np.float32(0.5), index=2),
        ],
        proposals=[
            {"box": [10.123, 20.456, 30.789, 40.0], "score": 0.912345},
            {"box": [1.0, 2.0, 3.0, 4.0], "score": 0.1},
            {"box": [50.5, 5.0, 70.25, 30.1], "score": 0.55557},
        ],
        plain="cat",
    )


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def test_retrieval_answer_json_shape_is_unchanged():
    expected = {
        "answer": "<ground>cat</ground><objects><obj0><obj2></objects>",
        "objects": [
            {"phrase": "cat", "index": 0, "box": [10.12, 20.46, 30.79, 40.0], "score": 0.8765},
            {"phrase": "cat", "index": 2, "box": [50.5, 5.0, 70.25, 30.1], "score": 0.5},
        ],
        "proposals": [
            {"box": [10.12, 20.46, 30.79, 40.0], "score": 0.9123},
            {"box": [1.0, 2.0, 3.0, 4.0], "score": 0.1},
            {"box": [50.5, 5.0, 70.25, 30.1], "score": 0.5556},
        ],
    }
    a = _retrieval_answer()
    out = a.to_json()
    assert out == expected
    assert list(out) == ["answer", "objects", "proposals"]
    assert [list(o) for o in out["objects"]] == [["phrase", "index", "box", "score"]] * 2
    assert json.loads(json.dumps(out)) == expected  # numpy scalars became plain floats

    a.problems = ["index 9 >= 3 boxes"]
    assert a.to_json() == {**expected, "problems": ["index 9 >= 3 boxes"]}


def test_defaults_and_decoder_object_without_index():
    a = Answer("a cat", [GroundedObject("cat", [1, 2, 3, 4], 0.25)])
    assert a.proposals == [] and a.problems == [] and a.plain == ""
    assert a.to_json() == {
        "answer": "a cat",
        "objects": [{"phrase": "cat", "box": [1, 2, 3, 4], "score": 0.25}],
        "proposals": [],
    }


def test_mask_and_keypoints_json_round_trip():
    mask = _rect_mask(10, 50, 25, 55)
    rle = mask_to_rle(mask)
    kps = _person_keypoints()
    kps[0] = [24.123456, 10.98765, 2]
    o = GroundedObject("person", [20.0, 8.0, 60.0, 60.0], 0.9, mask=rle, keypoints=kps)
    out = o.to_json()
    assert list(out) == ["phrase", "box", "score", "mask", "keypoints"]
    assert out["mask"] == {"size": [H, W], "counts": rle["counts"]}
    assert out["keypoints"][0] == [24.12, 10.99, 2]
    assert all(isinstance(k[2], int) for k in out["keypoints"])
    assert len(out["keypoints"]) == 17

    back = json.loads(json.dumps(out))
    assert back == out
    assert np.array_equal(rle_to_mask(back["mask"]), mask)
    again = GroundedObject.from_json(back)
    assert again.to_json() == out

    a = Answer("<ground>person</ground><objects><obj0></objects>", [o], [{"box": [20, 8, 60, 60], "score": 0.9}])
    assert Answer.from_json(json.loads(json.dumps(a.to_json()))).to_json() == a.to_json()


def test_bytes_rle_counts_become_json_strings():
    rle = mask_to_rle(_rect_mask(0, 4, 0, 4))
    o = GroundedObject("x", [0, 0, 4, 4], 1.0, index=3, mask={"size": rle["size"], "counts": rle["counts"].encode()})
    out = o.to_json()
    assert list(out) == ["phrase", "index", "box", "score", "mask"]
    assert out["mask"]["counts"] == rle["counts"]
    json.dumps(out)


def test_malformed_objects_are_refused():
    with pytest.raises(ValueError, match="xyxy"):
        GroundedObject("x", [0, 0, 1], 1.0)
    with pytest.raises(ValueError, match="17"):
        GroundedObject("x", [0, 0, 1, 1], 1.0, keypoints=[[0, 0, 2]] * 16)
    with pytest.raises(ValueError, match="17"):
        GroundedObject("x", [0, 0, 1, 1], 1.0, keypoints=[[0, 0]] * 17)


def test_skeleton_constants_are_cocos():
    assert len(COCO_PERSON_KEYPOINTS) == 17 and COCO_PERSON_KEYPOINTS[0] == "nose"
    assert COCO_PERSON_KEYPOINTS[-1] == "right_ankle"
    assert len(COCO_PERSON_SKELETON) == 19
    assert all(1 <= i <= 17 for limb in COCO_PERSON_SKELETON for i in limb)


# ---------------------------------------------------------------------------------------------
# COCO results
# ---------------------------------------------------------------------------------------------


def _coco_truth():
    """One image with a person (box, RLE mask, 15 labelled keypoints) and a ball (box, mask)."""
    person_mask = _rect_mask(8, 60, 20, 60)
    ball_mask = _rect_mask(40, 56, 70, 90)
    kps = _person_keypoints()
    cats = [
        {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(COCO_PERSON_KEYPOINTS),
         "skeleton": [list(limb) for limb in COCO_PERSON_SKELETON]},
        {"id": 2, "name": "ball", "supercategory": "item"},
    ]  # fmt: skip
    anns = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [20, 8, 40, 52], "area": int(person_mask.sum()),
         "iscrowd": 0, "segmentation": mask_to_rle(person_mask), "num_keypoints": sum(k[2] > 0 for k in kps),
         "keypoints": [n for k in kps for n in k]},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [70, 40, 20, 16], "area": int(ball_mask.sum()),
         "iscrowd": 0, "segmentation": mask_to_rle(ball_mask), "num_keypoints": 0, "keypoints": [0] * 51},
    ]  # fmt: skip
    dataset = {"images": [{"id": 7, "width": W, "height": H, "file_name": "7.png"}], "annotations": anns,
               "categories": cats}  # fmt: skip
    answer = Answer(
        "<ground>person</ground><objects><obj0></objects>\n<ground>ball</ground><objects><obj1></objects>",
        [
            GroundedObject("person", [20.0, 8.0, 60.0, 60.0], 0.95, index=0, mask=mask_to_rle(person_mask),
                           keypoints=kps),
            GroundedObject("ball", [70.0, 40.0, 90.0, 56.0], 0.8, index=1, mask=mask_to_rle(ball_mask)),
            GroundedObject("shadow", [0.0, 0.0, 5.0, 5.0], 0.7, index=2),  # no such category: left out
        ],
    )  # fmt: skip
    return dataset, answer


def test_to_coco_results_format():
    dataset, answer = _coco_truth()
    res = answer.to_coco(7, {"person": 1, "ball": 2})
    assert len(res) == 2
    person, ball = res
    assert list(person) == ["image_id", "category_id", "bbox", "score", "segmentation", "keypoints"]
    assert person["bbox"] == [20.0, 8.0, 40.0, 52.0] and person["score"] == 0.95
    assert person["segmentation"] == dataset["annotations"][0]["segmentation"]
    assert len(person["keypoints"]) == 51 and person["keypoints"][:3] == [24.0, 10.0, 2]
    assert ball == {"image_id": 7, "category_id": 2, "bbox": [70.0, 40.0, 20.0, 16.0], "score": 0.8,
                    "segmentation": dataset["annotations"][1]["segmentation"]}  # fmt: skip
    json.dumps(res)
    assert answer.to_coco(7, {}) == []


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_to_coco_evaluates_to_ap_one_with_pycocotools(iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, answer = _coco_truth()
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(answer.to_coco(7, {"person": 1, "ball": 2})))
        ev = COCOeval(gt, dt, iouType=iou_type)
        if iou_type == "keypoints":
            ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP @ IoU (OKS) .50:.95, all areas
    assert ev.stats[1] == pytest.approx(1.0)  # AP @ .50


def test_to_coco_segm_penalises_a_wrong_mask():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset, answer = _coco_truth()
    answer.objects[0].mask = mask_to_rle(_rect_mask(8, 20, 20, 30))  # a small corner of the person
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dataset)
        gt.createIndex()
        dt = gt.loadRes(answer.to_coco(7, {"person": 1, "ball": 2}))
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def _image() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([(xx * 2) % 256, (yy * 3) % 256, np.full_like(xx, 90)], axis=-1).astype(np.uint8)


def _enlarged(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((W * SCALE, H * SCALE), Image.Resampling.NEAREST))


def _px(arr: np.ndarray, x: float, y: float) -> np.ndarray:
    """The output pixel at input coordinates (x, y)."""
    return arr[int(y * SCALE), int(x * SCALE)].astype(int)


def test_draw_fills_masks_translucently_inside_only():
    img = _image()
    mask = _rect_mask(20, 40, 20, 60)
    a = Answer("", [GroundedObject("cat", [10.0, 10.0, 70.0, 50.0], 0.9, index=0, mask=mask_to_rle(mask))])
    out = np.asarray(a.draw(img))
    ref = _enlarged(img)
    assert out.shape == ref.shape == (H * SCALE, W * SCALE, 3)
    color = np.array(phrase_colors(["cat"])["cat"])
    for x, y in [(25.5, 25.5), (40.5, 30.5), (59.5, 39.5)]:  # inside the mask
        orig = _px(ref, x, y)
        assert not np.array_equal(_px(out, x, y), orig)
        assert np.abs(_px(out, x, y) - (orig * (1 - MASK_ALPHA) + color * MASK_ALPHA)).max() <= 1
    for x, y in [(15.5, 45.5), (65.5, 25.5), (40.5, 15.5), (85.5, 60.5), (5.5, 60.5)]:  # outside mask and box
        assert np.array_equal(_px(out, x, y), _px(ref, x, y))
    # the box outline stays on top of the fill
    assert np.array_equal(out[int(30.5 * SCALE), 10 * SCALE], color)


def test_draw_skips_a_mask_of_another_size():
    img = _image()
    small = mask_to_rle(_rect_mask(0, 8, 0, 8, h=10, w=10))
    a = Answer("", [GroundedObject("cat", [10.0, 10.0, 70.0, 50.0], 0.9, mask=small)])
    out = np.asarray(a.draw(img))
    ref = _enlarged(img)
    inside = (slice(int(20 * SCALE), int(45 * SCALE)), slice(int(15 * SCALE), int(65 * SCALE)))
    assert np.array_equal(out[inside], ref[inside])


def test_draw_person_skeleton():
    img = _image()
    kps = [[0.0, 0.0, 0] for _ in range(17)]
    kps[5] = [30.0, 30.0, 2]  # left shoulder
    kps[6] = [60.0, 30.0, 2]  # right shoulder: limb (6, 7) is drawn
    kps[11] = [30.0, 50.0, 0]  # left hip unlabelled: limb (6, 12) is not
    kps[7] = [30.0, 45.0, 1]  # left elbow occluded: limb (6, 8) is drawn, the point is a ring
    a = Answer("", [GroundedObject("person", [10.0, 10.0, 80.0, 60.0], 0.9, keypoints=kps)])
    out = np.asarray(a.draw(img))
    ref = _enlarged(img)
    color = np.array(phrase_colors(["person"])["person"])
    assert np.array_equal(out[30 * SCALE, 45 * SCALE], color)  # middle of the shoulders' limb
    assert np.array_equal(out[30 * SCALE, 60 * SCALE], color)  # a visible point, filled
    assert np.array_equal(out[int(37.5 * SCALE), 30 * SCALE], color)  # shoulder to occluded elbow
    assert np.array_equal(_px(out, 30.5, 48.5), _px(ref, 30.5, 48.5))  # shoulder to unlabelled hip: no limb
    assert np.array_equal(_px(out, 30, 50), _px(ref, 30, 50))  # the unlabelled hip: no point
    assert np.array_equal(_px(out, 0, 0), _px(ref, 0, 0))  # unlabelled points at (0, 0): nothing


def test_draw_survives_keypoints_off_the_image():
    img = _image()
    kps = [[float(i), float(i), 2] for i in range(17)]
    kps[5] = [-1e12, 30.0, 2]
    kps[6] = [1e12, 30.0, 2]
    kps[12] = [1e12, 1e9, 2]
    kps[7] = [float("nan"), 3.0, 2]
    kps[8] = [float("inf"), -float("inf"), 1]
    kps[9] = [W + 50.0, H / 2, 2]
    a = Answer("", [GroundedObject("person", [0.0, 0.0, W, H], 0.9, keypoints=kps)])
    out = a.draw(img)
    assert out.size == (W * SCALE, H * SCALE)
    color = np.array(phrase_colors(["person"])["person"])
    # limb (6, 7) runs across the image from far left to far right, clipped to it
    assert np.array_equal(np.asarray(out)[30 * SCALE, 5 * SCALE], color)


def test_draw_labels_proposals_and_large_images():
    img = np.zeros((500, 600, 3), dtype=np.uint8)  # not enlarged
    a = Answer(
        "",
        [GroundedObject("cat", [100, 100, 300, 300], 0.9, index=1), GroundedObject("dog", [350, 100, 500, 300], 0.8)],
        proposals=[{"box": [10, 400, 50, 450], "score": 0.3}],
    )
    plain = np.asarray(a.draw(img))
    assert plain.shape == (500, 600, 3)
    assert np.array_equal(plain[100, 200], phrase_colors(["cat"])["cat"])
    assert np.array_equal(plain[200, 350], phrase_colors(["cat", "dog"])["dog"])
    assert not plain[400, 30].any()
    assert np.array_equal(np.asarray(a.draw(img, show_proposals=True))[400, 30], (150, 150, 150))


# ---------------------------------------------------------------------------------------------
# supervision
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sv():
    with warnings.catch_warnings():  # supervision warns once when OpenCV is absent (its NumPy fallback)
        warnings.simplefilter("ignore")
        return pytest.importorskip("supervision")


def _three_objects(masks: bool = True) -> Answer:
    ms = [_rect_mask(0, 10, 0, 10), _rect_mask(5, 30, 40, 80), _rect_mask(50, 64, 0, 96)]
    return Answer(
        "",
        [
            GroundedObject("cat", [0.0, 0.0, 10.0, 10.0], 0.9, index=0, mask=mask_to_rle(ms[0])),
            GroundedObject("dog", [40.0, 5.0, 80.0, 30.0], 0.8, index=3, mask=mask_to_rle(ms[1])),
            GroundedObject("cat", [0.0, 50.0, 96.0, 64.0], 0.7, index=5, mask=mask_to_rle(ms[2]) if masks else None),
        ],
    )


def test_to_supervision_round_trip(sv):
    a = _three_objects()
    det = a.to_supervision()
    assert isinstance(det, sv.Detections)
    assert len(det) == 3
    np.testing.assert_allclose(det.xyxy, [o.box for o in a.objects])
    assert det.mask is not None and det.mask.shape == (3, H, W) and det.mask.dtype == bool
    for m, o in zip(det.mask, a.objects, strict=True):
        assert o.mask is not None and np.array_equal(m, rle_to_mask(o.mask))
    np.testing.assert_allclose(det.confidence, [0.9, 0.8, 0.7], rtol=1e-6)
    assert det.class_id.tolist() == [0, 1, 0]  # per distinct phrase, in order of appearance
    assert det.data["phrase"].tolist() == ["cat", "dog", "cat"]
    assert a.to_supervision({"dog": 7, "cat": 5}).class_id.tolist() == [5, 7, 5]
    with pytest.raises(KeyError, match="dog"):
        a.to_supervision({"cat": 5})


def test_to_supervision_masks_only_when_every_object_has_one(sv):
    det = _three_objects(masks=False).to_supervision()
    assert det.mask is None and len(det) == 3
    empty = Answer("nothing", []).to_supervision()
    assert len(empty) == 0 and empty.xyxy.shape == (0, 4)


def test_to_supervision_keypoints(sv):
    kps = _person_keypoints()
    a = Answer(
        "",
        [GroundedObject("ball", [0, 0, 5, 5], 0.5), GroundedObject("person", [20, 8, 60, 60], 0.9, keypoints=kps)],
    )
    kp = a.to_supervision_keypoints()
    assert isinstance(kp, sv.KeyPoints)
    assert kp.xy.shape == (1, 17, 2)
    assert kp.xy[0, 0].tolist() == [24.0, 10.0]
    assert kp.xy[0, 3].tolist() == [0.0, 0.0]  # absent (v = 0)
    assert kp.class_id.tolist() == [1]
    assert kp.data["phrase"].tolist() == ["person"] and kp.data["object"].tolist() == [1]
    if getattr(kp, "visible", None) is not None:
        assert kp.visible[0].tolist() == [k[2] > 0 for k in kps]


def test_to_supervision_without_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "supervision", None)  # makes `import supervision` fail
    msg = "Answer.to_supervision needs the optional package supervision: pip install 'perceive[supervision]'"
    with pytest.raises(ImportError, match=re.escape(msg)):
        _three_objects().to_supervision()
    with pytest.raises(ImportError, match=re.escape(msg)):
        _three_objects().to_supervision_keypoints()
