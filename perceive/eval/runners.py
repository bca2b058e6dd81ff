"""Each metric of ``perceive eval`` over its files: the ground truth and predictions read, checked and scored,
one ``Report`` (and the plots it can draw) per metric. ``HANDLERS[metric](args, problems)`` takes the
command's options; bad prediction records are counted in ``problems``."""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from perceive.eval import report as rep
from perceive.eval.inputs import Problems, box_problem, load_coco_results, load_humanref_predictions, load_records

METRICS = {
    "coco": "COCO box/mask AP (pycocotools): --gt instances.json --pred results.json",
    "lvis": "LVIS AP with rare/common/frequent: --gt lvis.json --pred results.json",
    "pr": "ChatRex P@0.5 / R@0.5 (scores ignored): --gt instances.json --pred results.json",
    "rec": "RefCOCO accuracy@0.5: --gt refs.json --instances instances.json --pred {sent_id, box} JSONL",
    "humanref": "HumanRef R/P/DF1: --gt humanref.jsonl --pred {id, extracted_predictions} JSONL",
    "res": "referring segmentation cIoU/gIoU: --gt humanref.jsonl --pred {id, segmentation RLE} JSONL",
    "panoptic": "PQ/SQ/RQ and mIoU: --gt panoptic.json --gt-dir PNGS --pred panoptic.json --pred-dir PNGS",
    "ss": "region classification SS / S-IoU: --gt {id, category} JSONL --pred {id, text} JSONL",
    "maps": "REF-VLM mAP_S: --gt instances.json --pred {image_id, bbox [x,y,w,h], phrase} JSON(L)",
    "cider": "CIDEr-D: --gt {id, references | caption} JSONL --pred {id, caption} JSONL",
}


def _need(args: argparse.Namespace, *names: str) -> None:
    for n in names:
        if getattr(args, n.replace("-", "_")) is None:
            raise ValueError(f"{args.metric} needs --{n}")


def _coco_like(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.data.readers import load_coco
    from perceive.eval import detection

    gt = load_coco(args.gt)
    if args.metric == "pr":
        results = load_coco_results(args.pred, gt, problems, need_score=False)
        m = detection.precision_recall(gt, results, args.iou)
        keys = [k for k in m if "@" in k]
        return rep.Report(
            "ChatRex precision and recall",
            m,
            [
                rep.Table(
                    "all",
                    [*keys, "matches", "predictions", "ground truth"],
                    [[m[k] for k in keys] + [m["matches"], m["predictions"], m["ground_truth"]]],
                )
            ],
            ["one-to-one matching per image and category, most matches possible"],
        ), {}
    results = load_coco_results(args.pred, gt, problems, iou_type=args.iou_type)
    if args.metric == "lvis":
        m = detection.lvis_ap(gt.dataset, results, args.iou_type)
        return rep.Report("LVIS AP", m, [rep.Table(args.iou_type, list(m), [list(m.values())])]), {}
    m = detection.coco_ap(gt, results, args.iou_type)
    keys = list(detection.COCO_KEYS)
    plots = {"curves": {"title": f"COCO {args.iou_type} at IoU 0.5", "curves": {"IoU 0.5": m["pr_curve"]}}}
    return rep.Report(f"COCO {args.iou_type} AP", m, [rep.Table(args.iou_type, keys, [[m[k] for k in keys]])]), plots


def _humanref(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.data.readers import read_humanref
    from perceive.eval.referring import humanref

    samples = read_humanref(args.gt)
    preds = load_humanref_predictions(args.pred, {s.id for s in samples}, problems)
    r = humanref(samples, preds)
    keys = list(r.overall)
    rows: list[list[object]] = [["all", r.counts.get("samples", 0), *[r.overall[k] for k in keys]]]
    rows += [[d, r.counts.get(f"domain:{d}", 0), *[v[k] for k in keys]] for d, v in r.by_domain.items()]
    tables = [
        rep.Table("by domain (non-rejection samples)", ["domain", "n", *keys], rows),
        rep.Table(
            "by sub-domain",
            ["sub-domain", "n", *keys],
            [[d, r.counts.get(f"sub_domain:{d}", 0), *[v[k] for k in keys]] for d, v in r.by_sub_domain.items()],
        ),
        rep.Table(
            "by ground-truth count",
            ["objects", "n", *keys],
            [[d, r.counts.get(f"objects:{d}", 0), *[v[k] for k in keys]] for d, v in r.by_count.items()],
        ),
        rep.Table(
            "rejection",
            ["correct", "total", "rate"],
            [[r.rejection["correct"], r.rejection["total"], r.rejection["rate"]]],
        ),
    ]
    full = {**r.to_json(), "by_sub_domain": r.by_sub_domain, "by_count": r.by_count, "counts": r.counts}
    head = [k for k in keys if k.startswith(("R@0.5", "P@0.5", "DF1@0.5")) and ":" not in k] or keys
    plots = {
        "bars": {
            "title": "HumanRef by domain",
            "labels": list(r.by_domain),
            "series": {k: [v[k] for v in r.by_domain.values()] for k in head},
        }
    }
    report = rep.Report(
        "HumanRef referring",
        full,
        tables,
        ["per-sample scores averaged over samples; DF1 = F1 x min(1, #GT / #predictions)"],
    )
    report.metrics["_stdout"] = r.to_json()
    return report, plots


def _rec(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.data.readers import coco_box, load_coco, read_refs
    from perceive.eval.referring import rec_accuracy

    _need(args, "instances")
    coco = load_coco(args.instances)
    refs = read_refs(args.gt)
    sent_ids = {s["sent_id"] for r in refs for s in r["sentences"]}

    def check(rec: dict, where: str) -> str | None:
        if rec["sent_id"] not in sent_ids:
            return f"field 'sent_id': unknown id {rec['sent_id']!r}"
        why = box_problem(rec["box"], "xyxy")
        return f"field 'box': {why}" if why else None

    preds = {r["sent_id"]: r["box"] for r in load_records(args.pred, {"sent_id": int, "box": list}, problems, (check,))}
    gt_boxes: list = []
    pred_boxes: list = []
    by_split: defaultdict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
    for ref in refs:
        box = coco_box(coco.anns[ref["ann_id"]])
        for s in ref["sentences"]:
            gt_boxes.append(box)
            pred_boxes.append(preds.get(s["sent_id"]))
            by_split[ref.get("split", "all")][0].append(box)
            by_split[ref.get("split", "all")][1].append(preds.get(s["sent_id"]))
    m = {"acc@0.5": rec_accuracy(gt_boxes, pred_boxes)}
    m.update({f"acc@0.5:{k}": rec_accuracy(*v) for k, v in sorted(by_split.items())})
    return rep.Report("Referring expression comprehension", m, [rep.Table("accuracy", list(m), [list(m.values())])]), {}


def _res(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.boxes import rle_to_mask
    from perceive.data.readers import read_humanref
    from perceive.eval.referring import segmentation_iou

    samples = read_humanref(args.gt)
    ids = {s.id for s in samples}

    def check(rec: dict, where: str) -> str | None:
        if str(rec["id"]) not in ids:
            return f"field 'id': unknown id {rec['id']!r}"
        try:
            rle_to_mask(rec["segmentation"])
        except (ValueError, TypeError, KeyError) as e:
            return f"field 'segmentation': {e}"
        return None

    preds = {
        str(r["id"]): rle_to_mask(r["segmentation"])
        for r in load_records(args.pred, {"id": (str, int), "segmentation": dict}, problems, (check,))
    }
    gts, outs = [], []
    for s in samples:
        if not s.answer_segmentations:
            continue
        masks = [rle_to_mask(r) for r in s.answer_segmentations]
        target = np.logical_or.reduce(masks)
        gts.append(target)
        outs.append(preds.get(s.id, np.zeros_like(target)))
    m = segmentation_iou(gts, outs)
    return rep.Report("Referring segmentation", m, [rep.Table("all", list(m), [list(m.values())])]), {}


def _panoptic(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.data.readers import load_json, read_panoptic
    from perceive.eval.panoptic import PanopticAccumulator, mean_iou, semantic_confusion

    _need(args, "gt-dir", "pred-dir")
    gt_json = load_json(args.gt)
    categories = gt_json["categories"]  # type: ignore[index]
    acc = PanopticAccumulator(categories)
    cat_index = {c["id"]: i + 1 for i, c in enumerate(categories)}  # 0 = void
    conf = np.zeros((len(categories) + 1, len(categories) + 1), dtype=np.int64)
    preds = {a["image_id"]: (a, m) for a, m in read_panoptic(args.pred, args.pred_dir)}
    for ann, gt_map in read_panoptic(args.gt, args.gt_dir):
        if ann["image_id"] not in preds:
            problems.report(f"{args.pred}", f"no prediction for image_id {ann['image_id']}")
            pred_ann: dict = {"segments_info": []}
            pred_map = np.zeros_like(gt_map)
        else:
            pred_ann, pred_map = preds[ann["image_id"]]
        acc.add(gt_map, ann["segments_info"], pred_map, pred_ann["segments_info"])
        conf += semantic_confusion(
            _semantic(gt_map, ann["segments_info"], cat_index),
            _semantic(pred_map, pred_ann["segments_info"], cat_index),
            len(categories) + 1,
        )
    m = acc.result()
    conf[0, :] = 0  # void ground truth is not scored; a class predicted as void still counts as missed
    per_class = [v for v in mean_iou(conf)["per_class_iou"][1:] if v is not None]
    m["mIoU"] = float(np.mean(per_class)) if per_class else 0.0
    keys = ["PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU"]
    per = m["per_class"]
    tables = [
        rep.Table("panoptic", keys, [[m[k] for k in keys]]),
        rep.Table(
            "per class",
            ["class", "PQ", "SQ", "RQ", "TP", "FP", "FN"],
            [[n, c["PQ"], c["SQ"], c["RQ"], c["tp"], c["fp"], c["fn"]] for n, c in per.items()],
        ),
    ]
    plots = {"bars": {"title": "PQ per class", "labels": list(per), "series": {"PQ": [c["PQ"] for c in per.values()]}}}
    return rep.Report("Panoptic segmentation", m, tables), plots


def _semantic(ids: np.ndarray, segments: list[dict], cat_index: dict[int, int]) -> np.ndarray:
    out = np.zeros(ids.shape, dtype=np.int64)
    for s in segments:
        out[ids == s["id"]] = cat_index.get(s["category_id"], 0)
    return out


def _texts_by_id(path: str, field: str, known: set[str], problems: Problems) -> dict[str, str]:
    """``{id: text}`` from prediction records ``{"id", field}``; unknown ids are bad records."""

    def check(rec: dict, where: str) -> str | None:
        return None if str(rec["id"]) in known else f"field 'id': unknown id {rec['id']!r}"

    records = load_records(path, {"id": (str, int), field: str}, problems, (check,))
    return {str(r["id"]): r[field] for r in records}


def _ss(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.eval.text import region_classification

    gt = {
        str(r["id"]): r["category"] for r in load_records(args.gt, {"id": (str, int), "category": str}, Problems(True))
    }
    preds = _texts_by_id(args.pred, "text", set(gt), problems)
    ids = sorted(gt)
    m = region_classification([preds.get(i, "") for i in ids], [gt[i] for i in ids])
    m["missing_predictions"] = sum(i not in preds for i in ids)
    return rep.Report(
        "Region classification",
        m,
        [rep.Table("all", list(m), [list(m.values())])],
        ["SentenceBERT all-MiniLM-L6-v2; a missing prediction scores as an empty string"],
    ), {}


def _maps(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.data.readers import load_coco
    from perceive.eval.text import map_s

    gt = load_coco(args.gt)
    images = set(gt.getImgIds())

    def check(rec: dict, where: str) -> str | None:
        if rec["image_id"] not in images:
            return f"field 'image_id': unknown id {rec['image_id']!r}"
        why = box_problem(rec["bbox"], "xywh")
        return f"field 'bbox': {why}" if why else None

    preds = load_records(args.pred, {"image_id": int, "bbox": list, "phrase": str}, problems, (check,))
    m = map_s(gt, preds)
    keys = ["mAP_S", "mAP_S50", "mAP_S75"]
    plots = {"curves": {"title": "mAP_S at IoU 0.5", "curves": {"IoU 0.5": m["pr_curve"]}}}
    return rep.Report("Open-vocabulary detection (mAP_S)", m, [rep.Table("all", keys, [[m[k] for k in keys]])]), plots


def _cider(args: argparse.Namespace, problems: Problems) -> tuple[rep.Report, dict]:
    from perceive.eval.text import cider_d

    refs: dict[str, list[str]] = defaultdict(list)
    for r in load_records(args.gt, {"id": (str, int)}, Problems(True)):
        refs[str(r["id"])] += list(r.get("references") or []) + ([r["caption"]] if "caption" in r else [])
    preds = _texts_by_id(args.pred, "caption", set(refs), problems)
    m = cider_d({k: preds.get(k, "") for k in refs}, refs)
    m["missing_predictions"] = sum(k not in preds for k in refs)
    return rep.Report(
        "Captioning (CIDEr-D)",
        m,
        [rep.Table("all", ["CIDEr-D", "missing"], [[f"{m['CIDEr-D']:.3f}", m["missing_predictions"]]])],
    ), {}


HANDLERS = {
    "coco": _coco_like,
    "lvis": _coco_like,
    "pr": _coco_like,
    "rec": _rec,
    "humanref": _humanref,
    "res": _res,
    "panoptic": _panoptic,
    "ss": _ss,
    "maps": _maps,
    "cider": _cider,
}
