"""MVP-LM's benchmark (``perceive benchmark --model MVP_FOLDER``): held-out records with masks, each asked the
field's three kinds of question, scored with the field's metrics.

- panoptic: every thing and stuff name present plus absent ones, shuffled -> PQ / SQ / RQ (all, things, stuff; COCO's
  panopticapi rules, ``perceive.eval.panoptic``) and semantic mIoU of the same segmentation;
- instances: the thing names present plus absent ones -> COCO mask AP and box AP (pycocotools) over every query's
  best guess;
- referring: each record's expressions (one, several or no targets) as sentences -> cIoU / gIoU of the union masks
  (a no-target expression answered with nothing counts 1), gRefCOCO's N-acc (no-target expressions answered with
  nothing) and T-acc (expressions with targets answered with something), REC Acc@0.5 (single-target expressions: the
  best object's box), DF1@0.5 (multi-target expressions) and DF1@0.5 by answer count (1 / 2-5 / 6-10 / >10).
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from perceive.boxes import mask_to_rle, rle_to_mask
from perceive.data.records import ImageRecord
from perceive.data.tasks_mvp import absent_names, is_stuff
from perceive.eval import detection, referring
from perceive.eval.panoptic import PanopticAccumulator, mean_iou_with_unlabelled, semantic_confusion
from perceive.eval.report import Report, Table
from perceive.formats.mvp import sentence_instruction, word_instruction
from perceive.models.mvp.perceiver_mvp import MvpPerceiver

TARGETS = {
    "PQ": 0.65, "PQ things": 0.55, "PQ stuff": 0.85, "mIoU": 0.80, "mask AP": 0.50, "box AP": 0.50,
    "referring cIoU": 0.60, "referring gIoU": 0.60, "N-acc": 0.80, "REC Acc@0.5": 0.70, "multi-target DF1@0.5": 0.60,
}  # fmt: skip
EXPRESSIONS_PER_RECORD = 8
IGNORE = 255


def _things(record: ImageRecord) -> list:
    return [i for i in record.instances if not i.iscrowd and i.granularity == "instance"]


def _gt_panoptic(
    record: ImageRecord, masks: dict[int, np.ndarray], category_ids: dict[str, int]
) -> tuple[np.ndarray, list[dict]]:
    """The record's panoptic ground truth: stuff regions, then whole instances over them."""
    ids = np.zeros((record.height, record.width), dtype=np.int64)
    segments = []
    regions = [i for i in record.instances if is_stuff(i)] + _things(record)
    for k, inst in enumerate(regions, start=1):
        ids[masks[inst.id]] = k
        segments.append({"id": k, "category_id": category_ids[inst.category], "iscrowd": 0})
    return ids, segments


def _semantic(ids: np.ndarray, segments: list[dict], index: dict[int, int]) -> np.ndarray:
    out = np.full(ids.shape, IGNORE, dtype=np.int64)
    for s in segments:
        out[ids == s["id"]] = index[s["category_id"]]
    return out


def run(perceiver: MvpPerceiver, records: Sequence[ImageRecord], progress: bool = True, name: str = "world") -> Report:
    from pycocotools.coco import COCO
    from tqdm import tqdm

    names: dict[str, int] = {}  # name -> isthing, over every record
    for r in records:
        for inst in r.instances:
            if is_stuff(inst):
                names.setdefault(inst.category, 0)
            elif not inst.iscrowd and inst.granularity == "instance":
                names[inst.category] = 1
    ordered = sorted(names.items())
    categories = [{"id": k, "name": n, "isthing": t} for k, (n, t) in enumerate(ordered, start=1)]
    category_ids = {n: k for k, (n, _) in enumerate(ordered, start=1)}
    index = {k: k - 1 for k in range(1, len(ordered) + 1)}  # category id -> its row of the confusion
    panoptic = PanopticAccumulator(categories)
    # one more predicted class, "unlabelled": a pixel the segmentation leaves out is a miss of its true class
    confusion = np.zeros((len(categories) + 1, len(categories) + 1), dtype=np.int64)
    coco_images: list[dict] = []
    coco_anns: list[dict] = []
    results: list[dict] = []
    ref: dict[str, list] = defaultdict(list)
    seconds, questions = 0.0, 0
    for image_id, record in enumerate(tqdm(records, desc="mvp benchmark", disable=not progress), start=1):
        rng = random.Random(image_id)
        masks = record.instance_masks()
        image = record.image()
        t0 = time.perf_counter()
        encoded = perceiver.encode_batch([image])[0]
        seconds += time.perf_counter() - t0
        # panoptic
        regions = [i for i in record.instances if is_stuff(i)] + _things(record)
        if regions:
            present = sorted({i.category for i in regions})
            asked = present + absent_names(record, set(present), rng)
            rng.shuffle(asked)
            instruction = word_instruction(asked)
            t0 = time.perf_counter()
            decoded = perceiver.decode(encoded, instruction)
            pred = perceiver.merge(decoded.predictions, instruction, encoded.frame)
            seconds, questions = seconds + time.perf_counter() - t0, questions + 1
            gt_ids, gt_segments = _gt_panoptic(record, masks, category_ids)
            pred_segments = [{"id": s["id"], "category_id": category_ids.get(s["category"], 0)} for s in pred.segments]
            pred_ids = pred.ids.astype(np.int64)
            for s in pred_segments:  # a name absent from every record: no category to score it as, so unlabeled
                if s["category_id"] == 0:
                    pred_ids[pred_ids == s["id"]] = 0
            pred_segments = [s for s in pred_segments if s["category_id"]]
            panoptic.add(gt_ids, gt_segments, pred_ids, pred_segments)
            gt_sem = _semantic(gt_ids, gt_segments, index)
            pred_sem = _semantic(pred_ids, pred_segments, index)
            pred_sem[pred_sem == IGNORE] = len(categories)  # an unlabeled prediction is wrong wherever truth is known
            confusion += semantic_confusion(gt_sem, pred_sem, len(categories) + 1)
        # instances
        things = _things(record)
        coco_images.append({"id": image_id, "width": record.width, "height": record.height})
        for inst in things:
            x0, y0, x1, y1 = inst.box
            m = masks[inst.id]
            coco_anns.append({"id": len(coco_anns) + 1, "image_id": image_id,
                              "category_id": category_ids[inst.category], "bbox": [x0, y0, x1 - x0, y1 - y0],
                              "area": float(m.sum()), "iscrowd": 0, "segmentation": mask_to_rle(m)})  # fmt: skip
        present = sorted({i.category for i in things})
        if present:
            asked = present + absent_names(record, set(present), rng)
            rng.shuffle(asked)
            instruction = word_instruction(asked)
            t0 = time.perf_counter()
            decoded = perceiver.decode(encoded, instruction)
            objects = perceiver.objects(decoded.predictions, instruction, encoded.frame, keep_all=True)
            seconds, questions = seconds + time.perf_counter() - t0, questions + 1
            for o in objects:
                if o.phrase not in category_ids:
                    continue
                x0, y0, x1, y1 = o.box
                results.append({"image_id": image_id, "category_id": category_ids[o.phrase], "score": o.score,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": o.mask})  # fmt: skip
        # referring
        by_id = {i.id: i for i in record.instances}
        expressions = [e for e in record.expressions if e.text.strip() and all(o in by_id for o in e.answer)]
        for e in rng.sample(expressions, min(EXPRESSIONS_PER_RECORD, len(expressions))):
            instruction = sentence_instruction(e.text)
            t0 = time.perf_counter()
            decoded = perceiver.decode(encoded, instruction)
            objects = perceiver.objects(decoded.predictions, instruction, encoded.frame)
            seconds, questions = seconds + time.perf_counter() - t0, questions + 1
            gt_union = np.zeros((record.height, record.width), dtype=bool)
            for o in e.answer:
                gt_union |= masks[o]
            pred_union = np.zeros_like(gt_union)
            for o in objects:
                if o.mask is not None:
                    pred_union |= rle_to_mask(o.mask)
            ref["gt_masks"].append(gt_union)
            ref["pred_masks"].append(pred_union)
            gt_boxes = [by_id[o].box for o in e.answer]
            pred_boxes = [o.box for o in objects]
            ref["targets"].append(len(e.answer))
            ref["answered"].append(len(objects))
            if not e.answer:
                continue
            scores = referring.sample_scores(gt_boxes, pred_boxes, points=False)
            ref["bucket"].append((referring.count_bucket(len(e.answer)), scores["DF1@0.5"]))
            if len(e.answer) == 1:
                ref["rec_gt"].append(gt_boxes[0])
                ref["rec_pred"].append(pred_boxes[0] if pred_boxes else None)
            else:
                ref["multi_df1"].append(scores["DF1@0.5"])

    pq = panoptic.result()
    miou = {"mIoU": mean_iou_with_unlabelled(confusion)}
    gt = COCO()
    things = [c for c in categories if c["isthing"]]
    gt.dataset = {"images": coco_images, "annotations": coco_anns, "categories": things}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it indexes
        gt.createIndex()
        mask_ap = detection.coco_ap(gt, results, "segm")
        box_ap = detection.coco_ap(gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results], "bbox")
    seg = (
        referring.segmentation_iou(ref["gt_masks"], ref["pred_masks"])
        if ref["gt_masks"]
        else {"cIoU": None, "gIoU": None}
    )
    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    accuracies = referring.target_accuracies(ref["targets"], ref["answered"])
    no_targets = sum(1 for t in ref["targets"] if t == 0)
    buckets = {b: mean([s for k, s in ref["bucket"] if k == b]) for b in ("1", "2-5", "6-10", ">10")}
    counts = {b: sum(1 for k, _ in ref["bucket"] if k == b) for b in buckets}
    measured = {
        "PQ": pq["PQ"], "PQ things": pq["PQ_things"], "PQ stuff": pq["PQ_stuff"], "mIoU": miou["mIoU"],
        "mask AP": mask_ap["AP"], "box AP": box_ap["AP"], "referring cIoU": seg["cIoU"], "referring gIoU": seg["gIoU"],
        "N-acc": accuracies["N-acc"], "REC Acc@0.5": referring.rec_accuracy(ref["rec_gt"], ref["rec_pred"])
        if ref["rec_gt"] else None, "multi-target DF1@0.5": mean(ref["multi_df1"]),
    }  # fmt: skip
    metrics = {**measured, "SQ": pq["SQ"], "RQ": pq["RQ"], "SQ things": pq["SQ_things"], "RQ things": pq["RQ_things"],
               "SQ stuff": pq["SQ_stuff"], "RQ stuff": pq["RQ_stuff"], "T-acc": accuracies["T-acc"],
               "mask AP50": mask_ap["AP50"], "box AP50": box_ap["AP50"],
               "DF1@0.5 by answer count": buckets, "expressions by answer count": counts,
               "no-target expressions": no_targets, "records": len(records), "questions": questions,
               "seconds per question": seconds / max(1, questions)}  # fmt: skip
    tables = [
        Table("Targets", ["measure", "target", "measured", "met"],
              [[k, t, measured[k], "-" if measured[k] is None else ("yes" if measured[k] >= t else "no")]
               for k, t in TARGETS.items()]),
        Table("Panoptic", ["", "PQ", "SQ", "RQ"],
              [["all", pq["PQ"], pq["SQ"], pq["RQ"]], ["things", pq["PQ_things"], pq["SQ_things"], pq["RQ_things"]],
               ["stuff", pq["PQ_stuff"], pq["SQ_stuff"], pq["RQ_stuff"]]]),
        Table("Instances (COCO AP)", ["", "AP", "AP50", "AP75"],
              [["mask", mask_ap["AP"], mask_ap["AP50"], mask_ap["AP75"]],
               ["box", box_ap["AP"], box_ap["AP50"], box_ap["AP75"]]]),
        Table("Referring", ["cIoU", "gIoU", "N-acc", "T-acc", "REC Acc@0.5", "multi-target DF1@0.5"],
              [[seg["cIoU"], seg["gIoU"], measured["N-acc"], metrics["T-acc"], measured["REC Acc@0.5"],
                measured["multi-target DF1@0.5"]]]),
        Table("Referring DF1@0.5 by answer count", ["1", "2-5", "6-10", ">10"],
              [[buckets[b] for b in buckets], [counts[b] for b in counts]]),
    ]  # fmt: skip
    notes = [f"{len(records)} {name} records, {questions} questions, {metrics['seconds per question']:.3f} s per "
             f"question (the caption written greedily, then the decoder); {no_targets} no-target "
             f"expressions", "semantic mIoU is read off the panoptic segmentation; unlabelled predicted pixels count "
             "as wrong"]  # fmt: skip
    return Report(f"MVP-LM benchmark ({name})", metrics, tables, notes)
