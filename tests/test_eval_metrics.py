import math

import numpy as np
import pytest
from pycocotools.coco import COCO

from perceive.data.readers import HumanRefSample
from perceive.eval import detection, panoptic, referring, text


def _coco(anns, cats=({"id": 1, "name": "circle"}, {"id": 2, "name": "square"})):
    ds = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "annotations": [
            {"id": i + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a} for i, a in enumerate(anns)
        ],
        "categories": list(cats),
    }
    coco = COCO()
    coco.dataset = ds
    coco.createIndex()
    return coco


def test_coco_ap_by_hand():
    gt = _coco(
        [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20]},
        ]
    )
    perfect = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [50, 50, 20, 20], "score": 0.8},
    ]
    assert detection.coco_ap(gt, perfect)["AP"] == pytest.approx(1.0)
    # a false positive ranked first, then one exact hit: precision 1/2 up to recall 1/2, then nothing;
    # 101-point interpolation gives 51 points of 0.5 -> 0.5 * 51 / 101 at every IoU threshold
    half = [
        {"image_id": 1, "category_id": 1, "bbox": [80, 0, 10, 10], "score": 0.9},
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.8},
    ]
    m = detection.coco_ap(gt, half)
    assert m["AP"] == pytest.approx(0.5 * 51 / 101) and m["AP50"] == pytest.approx(0.5 * 51 / 101)
    assert m["APl"] is None  # no large objects: undefined, not -1
    assert detection.coco_ap(gt, [])["AP"] == 0.0


def test_lvis_ap_frequency_groups():
    ds = {
        "images": [{"id": 1, "width": 100, "height": 100, "neg_category_ids": [], "not_exhaustive_category_ids": []}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
        ],
        "categories": [
            {"id": 1, "name": "a", "frequency": "r"},
            {"id": 2, "name": "b", "frequency": "f"},
            {"id": 3, "name": "c", "frequency": "c"},
        ],
    }
    m = detection.lvis_ap(ds, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}])
    assert m["APr"] == pytest.approx(1.0) and m["APf"] == 0.0 and m["APc"] is None
    assert m["AP"] == pytest.approx(0.5)
    ds["categories"][0].pop("frequency")
    with pytest.raises(ValueError, match="frequency"):
        detection.lvis_ap(ds, [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9}])


def test_chatrex_precision_recall_uses_maximum_matching():
    # p1 overlaps A strongly and B enough; p2 overlaps only A. Greedy-by-IoU would pair p1-A and leave
    # B unmatched; the one-to-one maximum matching pairs p1-B and p2-A.
    A, B = [0, 0, 10, 10], [4, 0, 14, 10]
    p1, p2 = [1, 0, 11, 10], [-3, 0, 7, 10]
    ious = referring._iou_matrix([A, B], [p1, p2])
    assert ious[0, 0] > ious[1, 0] >= 0.5 and ious[0, 1] >= 0.5 and ious[1, 1] < 0.5
    gt = _coco(
        [
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": 1, "bbox": [4, 0, 10, 10]},
            {"image_id": 2, "category_id": 2, "bbox": [0, 0, 10, 10]},
        ]
    )
    res = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10]},
        {"image_id": 1, "category_id": 1, "bbox": [-3, 0, 10, 10]},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 10, 10]},
    ]  # right place, wrong category
    m = detection.precision_recall(gt, res)
    assert (m["matches"], m["predictions"], m["ground_truth"]) == (2, 3, 3)
    assert m["P@0.5"] == pytest.approx(2 / 3) and m["R@0.5"] == pytest.approx(2 / 3)


def test_rec_accuracy():
    gt = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    assert referring.rec_accuracy(gt, [[0, 0, 10, 10], [0, 0, 10, 4], None]) == pytest.approx(1 / 3)
    assert referring.rec_accuracy(gt[:1], [[0, 0, 10, 5]]) == 1.0  # IoU exactly 0.5 counts


def _sample(id_, gt, domain="property", sub="attribute", masks=None):
    return HumanRefSample(id_, "x.png", "e", [], gt, domain, sub, masks or [])


def test_humanref_by_hand():
    box = [0, 0, 10, 10]
    samples = [
        _sample("a", [box, [20, 0, 30, 10]]),  # 2 GT, 3 predictions, both GT hit exactly
        _sample("b", [box], domain="position", sub="ordinal"),  # predicted nothing
        _sample("c", [box], domain="position", sub="ordinal"),  # IoU 0.7: hit at 0.5..0.7 only
        _sample("r1", [], domain="rejection"),
        _sample("r2", [], domain="rejection"),
    ]
    preds = {"a": [box, [20, 0, 30, 10], [50, 50, 60, 60]], "c": [[0, 0, 10, 7]], "r2": [[1, 1, 2, 2]]}
    r = referring.humanref(samples, preds)
    f1_a = 2 * (2 / 3) * 1 / (2 / 3 + 1)
    assert r.by_domain["property"]["R@0.5"] == 1.0
    assert r.by_domain["property"]["DF1@0.5"] == pytest.approx(f1_a * 2 / 3)
    assert r.by_domain["position"]["R@0.5"] == pytest.approx(0.5)  # b: 0, c: 1
    # c's recall over the ten thresholds: hits at 0.5, 0.55, 0.6, 0.65, 0.7 -> 0.5; b: 0
    assert r.by_domain["position"]["R@0.5:0.95"] == pytest.approx(0.25)
    assert r.overall["R@0.5"] == pytest.approx((1 + 0 + 1) / 3)
    assert r.overall["P@0.5"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert r.rejection == {"correct": 1, "total": 2, "rate": 0.5}
    assert set(r.by_count) == {"1", "2-5"}
    assert r.counts == {"samples": 3, "domain:property": 1, "domain:position": 2, "sub_domain:property/attribute": 1,
                        "sub_domain:position/ordinal": 2, "objects:2-5": 1, "objects:1": 2}  # fmt: skip
    js = r.to_json()
    assert set(js) == {"all", "property", "position", "rejection"}
    assert set(js["all"]) == {"R@0.5", "P@0.5", "DF1@0.5", "R@0.5:0.95", "P@0.5:0.95", "DF1@0.5:0.95"}


def test_standard_error_bound_is_that_of_right_or_wrong_scores():
    # four right-or-wrong scores, two right: the standard deviation 0.5 over sqrt(4)
    assert referring.standard_error_bound(0.5, 4) == pytest.approx(0.25)
    scores = np.array([1.0, 0.5, 0.5, 0.0, 1.0, 0.75])  # partly right scores vary less than the bound
    assert scores.std() / np.sqrt(len(scores)) < referring.standard_error_bound(scores.mean(), len(scores))
    assert referring.standard_error_bound(1.0, 50) == 0.0
    assert referring.standard_error_bound(0.5, 1) is None and referring.standard_error_bound(None, 10) is None


def test_humanref_greedy_order_is_the_reference_rule():
    # GT 1 takes the prediction it overlaps most, even though GT 2 could only use that one
    g1, g2 = [0, 0, 10, 10], [2, 0, 12, 10]
    pa, pb = [1, 0, 11, 10], [-3, 0, 7, 10]
    assert referring.greedy_matches([g1, g2], [pa, pb], 0.5) == 1
    assert detection.match_one_to_one(np.array([g1, g2]), np.array([pa, pb]), 0.5) == 2


def test_humanref_points_and_empty_first_prediction():
    m1 = np.zeros((20, 20), dtype=bool)
    m1[0:5, 0:5] = True
    m2 = np.zeros((20, 20), dtype=bool)
    m2[10:15, 10:15] = True
    from perceive.boxes import mask_to_rle

    s = [
        _sample("a", [[0, 0, 5, 5], [10, 10, 15, 15]], masks=[mask_to_rle(m1), mask_to_rle(m2)]),
        _sample("b", [[0, 0, 5, 5]], masks=[mask_to_rle(m1)]),
    ]
    # the first sample predicts nothing (the reference crashes there); the second a point inside
    r = referring.humanref(s, {"a": [], "b": [[2.5, 2.5], [19.5, 19.5]]})
    assert r.overall["R@point"] == pytest.approx(0.5) and r.overall["P@point"] == pytest.approx(0.25)
    assert r.overall["DF1@point"] == pytest.approx((0 + 2 * 0.5 * 1 / 1.5 * 0.5) / 2)
    with pytest.raises(ValueError, match="mix"):
        referring.humanref(s, {"a": [[1, 1]], "b": [[0, 0, 5, 5]]})


def test_density_f1_edges():
    assert referring.density_f1(0.0, 0.0, 3, 0) == 0.0
    assert referring.density_f1(1.0, 0.5, 2, 4) == pytest.approx(2 * 0.5 / 1.5 * 0.5)
    assert referring.density_f1(0.5, 1.0, 2, 1) == pytest.approx(2 * 0.5 / 1.5)


def test_cumulative_and_generalized_iou():
    g1 = np.zeros((4, 4), bool)
    g1[:2] = True  # 8 px
    p1 = np.zeros((4, 4), bool)
    p1[:1] = True  # 4 px inside
    g2 = np.zeros((4, 4), bool)
    p2 = np.zeros((4, 4), bool)  # no target, nothing predicted: IoU 1 for gIoU
    m = referring.segmentation_iou([g1, g2], [p1, p2])
    assert m["cIoU"] == pytest.approx(4 / 8) and m["gIoU"] == pytest.approx((0.5 + 1.0) / 2)


def test_panoptic_quality_by_hand():
    gt = np.zeros((10, 20), dtype=np.int64)
    gt[0:5, 0:10] = 1  # thing A, category 1, 50 px
    gt[5:10, 0:10] = 2  # stuff S, category 2, 50 px
    gt[:, 10:15] = 3  # thing B, category 1, never predicted -> FN
    pred = np.zeros_like(gt)
    pred[0:4, 0:10] = 11  # A': IoU 40/50
    pred[4:10, 0:10] = 12  # S': IoU 50/60
    pred[:, 15:20] = 13  # C: lies on void only -> not a FP
    cats = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "stuff", "isthing": 0}]
    acc = panoptic.PanopticAccumulator(cats)
    acc.add(
        gt,
        [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}, {"id": 3, "category_id": 1}],
        pred,
        [{"id": 11, "category_id": 1}, {"id": 12, "category_id": 2}, {"id": 13, "category_id": 1}],
    )
    m = acc.result()
    assert m["per_class"]["thing"]["PQ"] == pytest.approx(0.8 / 1.5)
    assert m["per_class"]["thing"]["SQ"] == pytest.approx(0.8) and m["per_class"]["thing"]["RQ"] == pytest.approx(
        1 / 1.5
    )
    assert m["per_class"]["stuff"]["PQ"] == pytest.approx(50 / 60)
    assert m["PQ"] == pytest.approx((0.8 / 1.5 + 50 / 60) / 2)
    assert m["PQ_things"] == pytest.approx(0.8 / 1.5) and m["PQ_stuff"] == pytest.approx(50 / 60)


def test_panoptic_crowd_regions_forgive_predictions():
    gt = np.zeros((4, 4), dtype=np.int64)
    gt[:, :2] = 5  # a crowd region of category 1
    pred = np.zeros_like(gt)
    pred[:, :2] = 7
    acc = panoptic.PanopticAccumulator([{"id": 1, "name": "t", "isthing": 1}])
    acc.add(gt, [{"id": 5, "category_id": 1, "iscrowd": 1}], pred, [{"id": 7, "category_id": 1}])
    assert acc.result()["per_class"] == {}  # neither FN (crowd) nor FP (on crowd)


def test_mean_iou_by_hand():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 0]])
    conf = panoptic.semantic_confusion(gt, pred, 3)
    m = panoptic.mean_iou(conf)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: tp 1, gt 2, pred 1 -> 1/2
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert m["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="labels"):
        panoptic.semantic_confusion(gt, pred + 5, 3)


def test_cider_d_by_hand():
    refs = {"1": ["a b"], "2": ["c d"]}
    m = text.cider_d({"1": "a", "2": "c d"}, refs)
    # idf of every n-gram is log 2 (each appears in one of two images).
    # image 1: unigram cosine 1/sqrt(2), length penalty exp(-1/72), no bigrams -> 10 * that / 4
    img1 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    # image 2: unigrams and the bigram match exactly; no 3- or 4-grams -> 10 * 2 / 4
    assert m["per_image"]["1"] == pytest.approx(img1)
    assert m["per_image"]["2"] == pytest.approx(5.0)
    assert m["CIDEr-D"] == pytest.approx((img1 + 5.0) / 2)
    long = {"1": ["the red circle is big"], "2": ["two green squares on grass"]}
    assert text.cider_d({"1": "The red circle, is big.", "2": "x"}, long)["per_image"]["1"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no references"):
        text.cider_d({"3": "x"}, refs)


def test_semantic_iou_osprey_rule():
    assert text.semantic_iou("Red_circle.", "red circle") == 1.0
    assert text.semantic_iou("circle", "red circle") == 0.5
    assert text.semantic_iou("", "dog") == 0.0


class KeywordEncoder:
    """A deterministic stand-in encoder: one dimension per known word."""

    words = ("circle", "square", "red", "dog", "puppy", "plane")

    def encode(self, texts):
        v = np.array([[float(w in t.split()) for w in self.words] + [1e-3] for t in texts])
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_region_classification_and_map_s_with_a_stand_in_encoder():
    m = text.region_classification(["red circle", "square"], ["circle", "square"], KeywordEncoder())
    assert m["S-IoU"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["SS"] == pytest.approx((1 / math.sqrt(2) + 1) / 2, abs=1e-3)
    gt = _coco(
        [
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
            {"image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 20]},
        ]
    )
    preds = [
        {"image_id": 1, "bbox": [10, 10, 20, 20], "phrase": "a red circle"},
        {"image_id": 1, "bbox": [50, 50, 20, 20], "phrase": "square"},
    ]
    assert text.map_s(gt, preds, KeywordEncoder())["mAP_S"] == pytest.approx(1.0)
    swapped = [{**preds[0], "phrase": "square"}, {**preds[1], "phrase": "circle"}]
    assert text.map_s(gt, swapped, KeywordEncoder())["mAP_S"] == 0.0


@pytest.mark.slow
def test_minilm_is_the_real_sentence_encoder():
    enc = text.default_encoder()
    e = enc.encode(["a dog", "a puppy", "an airplane", "a dog"])
    assert e.shape == (4, 384) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2 and e[0] @ e[3] == pytest.approx(1.0, abs=1e-5)
    m = text.region_classification(["circle"], ["circle"])
    assert m["SS"] == pytest.approx(1.0, abs=1e-5) and m["S-IoU"] == 1.0


def test_humanref_all_rejection_file_and_duplicate_predictions():
    r = referring.humanref(
        [_sample("r1", [], domain="rejection"), _sample("r2", [], domain="rejection")], {"r2": [[0, 0, 1, 1]]}
    )
    assert r.overall == dict.fromkeys(referring.BOX_KEYS) and r.by_domain == {}
    assert r.rejection == {"correct": 1, "total": 2, "rate": 0.5}
    # the same right box twice: one match, the copy costs precision and density
    box = [0, 0, 10, 10]
    d = referring.humanref([_sample("a", [box])], {"a": [box, box]})
    assert d.overall["R@0.5"] == 1.0 and d.overall["P@0.5"] == 0.5
    assert d.overall["DF1@0.5"] == pytest.approx(2 * 0.5 / 1.5 * 0.5)
