import json

import pytest
from cli_runner import run_cli

from perceive.world import export
from perceive.world.generator import WorldConfig


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "world"
    export.write_dataset(out, 4, seed=5, config=WorldConfig(size=96, person_share=0.4), progress=False)
    return out


def _eval(*args):
    return run_cli("eval", *args)


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_humanref_perfect_predictions_and_json_shape(world, tmp_path):
    gt = [json.loads(line) for line in (world / "humanref.jsonl").read_text().splitlines()]
    preds = _jsonl(tmp_path / "p.jsonl", [{"id": g["id"], "extracted_predictions": g["answer_boxes"]} for g in gt])
    r = _eval("humanref", "--gt", world / "humanref.jsonl", "--pred", preds, "--json", "--out", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    domains = {g["domain"] for g in gt} - {"rejection"}
    assert set(out) == {"all", "rejection", *domains}
    for key in ("all", *domains):
        assert out[key] == {
            "R@0.5": 1.0,
            "P@0.5": 1.0,
            "DF1@0.5": 1.0,
            "R@0.5:0.95": 1.0,
            "P@0.5:0.95": 1.0,
            "DF1@0.5:0.95": 1.0,
        }
    n_rej = sum(g["domain"] == "rejection" for g in gt)
    assert out["rejection"] == {"correct": n_rej, "total": n_rej, "rate": 1.0}
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"metrics.json", "report.md", "bars.png"}
    assert "by sub-domain" in (tmp_path / "rep" / "report.md").read_text()


def test_bad_prediction_records_are_skipped_and_counted_or_fail_strictly(world, tmp_path):
    gt = [json.loads(line) for line in (world / "humanref.jsonl").read_text().splitlines()]
    good = {"id": gt[0]["id"], "extracted_predictions": gt[0]["answer_boxes"]}
    preds = tmp_path / "p.jsonl"
    preds.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps({"id": "nope", "extracted_predictions": []}),
                json.dumps({"id": gt[1]["id"], "extracted_predictions": [[10, 10, 5, 5]]}),
                '{"id": "' + gt[2]["id"] + '", "extracted_predictions": [[0, 0, NaN, 5]]}',
                json.dumps({"extracted_predictions": []}),
                json.dumps({"id": gt[3]["id"], "extracted_predictions": "x"}),
                "not json",
            ]
        )
        + "\n"
    )
    r = _eval("humanref", "--gt", world / "humanref.jsonl", "--pred", preds)
    assert r.returncode == 0, r.stderr
    assert "skipped 6 bad prediction records" in r.stdout
    r = _eval("humanref", "--gt", world / "humanref.jsonl", "--pred", preds, "--strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "p.jsonl:2: field 'id': unknown id 'nope'" in r.stderr


def test_coco_pr_and_maps_on_world_ground_truth(world, tmp_path):
    inst = json.loads((world / "instances.json").read_text())
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in inst["annotations"]
    ]
    (tmp_path / "r.json").write_text(json.dumps(results))
    r = _eval(
        "coco", "--gt", world / "instances.json", "--pred", tmp_path / "r.json", "--json", "--out", tmp_path / "c"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["AP"] == pytest.approx(1.0)
    assert (tmp_path / "c" / "pr_curve.png").exists()
    r = _eval("pr", "--gt", world / "instances.json", "--pred", tmp_path / "r.json", "--json")
    m = json.loads(r.stdout)
    assert m["P@0.5"] == 1.0 and m["R@0.5"] == 1.0
    names = {c["id"]: c["name"] for c in inst["categories"]}
    phrases = [
        {"image_id": a["image_id"], "bbox": a["bbox"], "phrase": names[a["category_id"]]} for a in inst["annotations"]
    ]
    (tmp_path / "m.json").write_text(json.dumps(phrases))
    r = _eval("maps", "--gt", world / "instances.json", "--pred", tmp_path / "m.json", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mAP_S"] == pytest.approx(1.0)


def test_panoptic_res_rec_ss_cider_on_world(world, tmp_path):
    r = _eval(
        "panoptic",
        "--gt",
        world / "panoptic.json",
        "--gt-dir",
        world / "panoptic",
        "--pred",
        world / "panoptic.json",
        "--pred-dir",
        world / "panoptic",
        "--json",
    )
    m = json.loads(r.stdout)
    assert m["PQ"] == pytest.approx(1.0) and m["mIoU"] == pytest.approx(1.0)

    gt = [json.loads(line) for line in (world / "humanref.jsonl").read_text().splitlines()]
    import numpy as np

    from perceive.boxes import mask_to_rle, rle_to_mask

    segs = [
        {
            "id": g["id"],
            "segmentation": mask_to_rle(np.logical_or.reduce([rle_to_mask(s) for s in g["answer_segmentations"]])),
        }
        for g in gt
        if g["answer_segmentations"]
    ]
    r = _eval("res", "--gt", world / "humanref.jsonl", "--pred", _jsonl(tmp_path / "s.jsonl", segs), "--json")
    assert json.loads(r.stdout)["cIoU"] == pytest.approx(1.0)

    refs = json.loads((world / "refs.json").read_text())
    inst = {a["id"]: a for a in json.loads((world / "instances.json").read_text())["annotations"]}
    recs = []
    for ref in refs:
        x, y, w, h = inst[ref["ann_id"]]["bbox"]
        recs += [{"sent_id": s["sent_id"], "box": [x, y, x + w, y + h]} for s in ref["sentences"]]
    recs[0]["box"] = [0, 0, 1, 1]
    r = _eval(
        "rec",
        "--gt",
        world / "refs.json",
        "--instances",
        world / "instances.json",
        "--pred",
        _jsonl(tmp_path / "rec.jsonl", recs),
        "--json",
    )
    assert json.loads(r.stdout)["acc@0.5"] == pytest.approx(1 - 1 / len(recs))

    lang = [json.loads(line) for line in (world / "language.jsonl").read_text().splitlines()]
    regions = [x for x in lang if x["type"] == "region_caption"][:10]
    gt_ss = _jsonl(tmp_path / "g.jsonl", [{"id": x["object"], "category": x["category"]} for x in regions])
    pred_ss = _jsonl(tmp_path / "t.jsonl", [{"id": x["object"], "text": x["category"]} for x in regions])
    m = json.loads(_eval("ss", "--gt", gt_ss, "--pred", pred_ss, "--json").stdout)
    assert m["SS"] == pytest.approx(1.0, abs=1e-5) and m["S-IoU"] == 1.0

    caps = [x for x in lang if x["type"] == "caption_brief"]
    gt_c = _jsonl(tmp_path / "gc.jsonl", [{"id": x["image_id"], "caption": x["text"]} for x in caps])
    pred_c = _jsonl(tmp_path / "pc.jsonl", [{"id": x["image_id"], "caption": x["text"]} for x in caps])
    m = json.loads(_eval("cider", "--gt", gt_c, "--pred", pred_c, "--json").stdout)
    assert m["CIDEr-D"] > 1.0


def test_eval_errors_are_one_line(world, tmp_path):
    r = _eval("humanref", "--gt", tmp_path / "missing.jsonl", "--pred", tmp_path / "x.jsonl")
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = _eval("rec", "--gt", world / "refs.json", "--pred", tmp_path / "x.jsonl")
    assert r.returncode == 1 and "needs --instances" in r.stderr
