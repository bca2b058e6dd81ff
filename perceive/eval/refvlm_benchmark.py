"""REF-VLM's benchmark (``perceive benchmark --model REFVLM_FOLDER``): held-out records asked Table II's questions,
each answer scored both as the model writes it (under the TRP grammar) and teacher-forced (the decoders reading the
``<REF>`` s of the true answer), with the field's metrics.

- answers: the share that parse with no problem, and of the questions with a known number of targets, the share
  whose answer has that many ``<REF>`` s (generated only);
- referring (REC template, every kind of expression the record has): REC Acc@0.5 on single-target expressions;
  HumanRef's DF1@0.5 averaged within each domain and then over domains (expressions with targets); rejection
  accuracy (no-target expressions answered with nothing); DF1@0.5 by answer count (1 / 2-5 / 6-10 / >10);
- RES (single-target expressions): cIoU / gIoU of the predicted masks' union (``perceive.eval.referring``);
- interactive grounding: one object per record, asked from a point, a box, a scribble and its mask: mIoU and cIoU
  per prompt kind;
- keypoints: OKS AP (pycocotools' keypoints mode) and PCK@0.1 of the persons found, beside a baseline that places
  the mean pose of other records' persons (``keypoint_template``) in the model's own person boxes;
- GCG-box: the record's first grounded caption: GLaMM's AP50, mIoU and recall (``perceive.eval.grounded_captions``);
- FOVD: mAP_S (Sec. V; ``perceive.eval.text.map_s``): each predicted phrase takes the true category whose name is
  most similar (sentence embeddings) as its label and that similarity as its score; COCO box AP of those.
"""

from __future__ import annotations

import contextlib
import io
import random
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from perceive.boxes import pair_iou, rle_to_mask
from perceive.data.records import ImageRecord
from perceive.data.tasks_refvlm import (
    caption_item,
    everything_item,
    interactive_item,
    keypoint_item,
    keypoint_people,
    prompt_for,
    refer_item,
    whole_instances,
)
from perceive.eval import referring, text
from perceive.eval.grounded_captions import gcg_scores
from perceive.eval.keypoints import keypoint_ap, keypoint_template, pck_hits, place_template
from perceive.eval.report import Report, Table
from perceive.models.refvlm.configuration_refvlm import BOX_READOUTS
from perceive.models.refvlm.perceiver_refvlm import Decoded, RefVlmPerceiver

TARGETS = {
    "answers parse cleanly": 0.99, "answers with the right <REF> count": 0.90, "REC Acc@0.5": 0.85,
    "RES cIoU": 0.70, "RES gIoU": 0.65, "IG mIoU (mask)": 0.85, "IG mIoU (box)": 0.80, "IG mIoU (point)": 0.75,
    "IG mIoU (scribble)": 0.75, "keypoint OKS AP": 0.60, "multi-instance DF1@0.5": 0.75, "rejection accuracy": 0.90,
}  # fmt: skip
EXPRESSIONS_PER_RECORD = 3
TEMPLATE_RECORDS = 200  # records whose persons give the keypoint baseline's mean pose
PROMPT_KINDS = ("mask", "box", "point", "scribble")
MODES = ("generated", "teacher-forced")


def _union(objects, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for o in objects:
        if o.mask is not None:
            out |= rle_to_mask(o.mask).astype(bool)
    return out


def template_people(records: Sequence[ImageRecord]) -> list[tuple[list[float], list[list[float]]]]:
    return [(list(i.box), list(i.keypoints or [])) for r in records for i in keypoint_people(r)]


def run(perceiver: RefVlmPerceiver, records: Sequence[ImageRecord], progress: bool = True, name: str = "world",
        template_records: Sequence[ImageRecord] = ()) -> Report:  # fmt: skip
    """Every measure over ``records``; the keypoint baseline's mean pose comes from ``template_records`` (other
    records than those measured; none: the measured records' own, which flatters the baseline)."""
    from pycocotools.coco import COCO
    from tqdm import tqdm

    template = None
    people = template_people(template_records or records)
    if people:
        template = keypoint_template([(b, k) for b, k in people])
    answers: dict[str, list[bool]] = {"clean": [], "count": []}
    ref: dict[str, dict[str, list]] = {m: defaultdict(list) for m in MODES}
    ig: dict[str, dict[str, list]] = {m: defaultdict(list) for m in MODES}
    kp_images: list[dict] = []
    kp_gt: list[dict] = []
    kp_results: dict[str, list[dict]] = {m: [] for m in (*MODES, "template baseline")}
    pck: dict[str, list[tuple[int, int]]] = {m: [] for m in (*MODES, "template baseline")}
    det_categories: dict[str, int] = {}
    det_gt: list[dict] = []
    det_results: list[dict] = []
    gcg: dict[str, list] = {m: [] for m in MODES}
    seconds, questions = 0.0, 0

    def ask(encoded, item) -> dict[str, Decoded]:
        nonlocal seconds, questions
        t0 = time.perf_counter()
        generated = perceiver.generate(encoded, item.question, item.prompts)
        seconds, questions = seconds + time.perf_counter() - t0, questions + 1
        answers["clean"].append(not generated.problems)
        answers["count"].append(len(generated.ref_units) == sum(len(g.targets) for g in item.groups))
        return {"generated": generated, "teacher-forced": perceiver.teacher_forced(encoded, item)}

    for image_id, record in enumerate(tqdm(records, desc="refvlm benchmark", disable=not progress), start=1):
        rng = random.Random(image_id)
        masks = record.instance_masks()
        shape = (record.height, record.width)
        encoded = perceiver.encode_batch([record.image()])[0]
        frame = encoded.frame
        by_id = {i.id: i for i in record.instances}
        # referring: REC, multi-instance and rejection
        expressions = [e for e in record.expressions if e.text.strip() and all(o in by_id for o in e.answer)]
        for e in rng.sample(expressions, min(EXPRESSIONS_PER_RECORD, len(expressions))):
            for mode, decoded in ask(encoded, refer_item(record, e, "refer_box")).items():
                boxes = [o.box for o in perceiver.objects(decoded, frame)]
                r = ref[mode]
                if not e.answer:
                    r["rejected"].append(not boxes)
                    continue
                gt = [by_id[o].box for o in e.answer]
                df1 = referring.sample_scores(gt, boxes, points=False)["DF1@0.5"]
                r["domain"].append((e.domain or "all", df1))
                r["bucket"].append((referring.count_bucket(len(gt)), df1))
                if len(gt) == 1:
                    r["rec_gt"].append(gt[0])
                    r["rec_pred"].append(boxes[0] if boxes else None)
                    for readout in BOX_READOUTS:  # both heads of the box decoder, to choose between on validation
                        same = readout == perceiver.config.box_readout
                        other = boxes if same else [o.box for o in perceiver.objects(decoded, frame, readout)]
                        r[f"rec_{readout}"].append(other[0] if other else None)
        # RES
        single = [e for e in expressions if len(e.answer) == 1 and e.answer[0] in masks]
        if single:
            e = rng.choice(single)
            for mode, decoded in ask(encoded, refer_item(record, e, "refer_mask")).items():
                ref[mode]["res_gt"].append(masks[e.answer[0]])
                ref[mode]["res_pred"].append(_union(perceiver.objects(decoded, frame), shape))
        # interactive grounding: one object, every kind of prompt
        prompted = [p.object for p in record.prompts if p.object in masks]
        candidates = prompted or [i.id for i in whole_instances(record) if i.id in masks]
        if candidates:
            inst = by_id[candidates[0]]
            for kind in PROMPT_KINDS:
                prompt = prompt_for(kind, masks[inst.id], list(inst.box), rng)
                for mode, decoded in ask(encoded, interactive_item(record, inst, prompt)).items():
                    ig[mode][kind].append((masks[inst.id], _union(perceiver.objects(decoded, frame), shape)))
        # keypoints
        persons = keypoint_people(record)
        kp_images.append({"id": image_id, "width": record.width, "height": record.height})
        if persons:
            for p in persons:
                x0, y0, x1, y1 = p.box
                kps = [v for k in (p.keypoints or []) for v in k]
                area = float(masks[p.id].sum()) if p.id in masks else (x1 - x0) * (y1 - y0)
                kp_gt.append({"id": len(kp_gt) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                              "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "keypoints": kps,
                              "num_keypoints": sum(1 for k in (p.keypoints or []) if k[2] > 0)})  # fmt: skip
            item = keypoint_item(record, persons)
            for mode, decoded in ask(encoded, item).items():
                objects = [o for o in perceiver.objects(decoded, frame) if o.keypoints is not None]
                guesses: dict[str, list[tuple]] = {mode: [(o.box, o.keypoints, o.score) for o in objects]}
                if mode == "generated" and template is not None:
                    guesses["template baseline"] = [(o.box, place_template(template, o.box), o.score)
                                                    for o in objects]  # fmt: skip
                for kind, found in guesses.items():
                    for _, kps, score in found:
                        kp_results[kind].append({"image_id": image_id, "category_id": 1, "score": float(score),
                                              "keypoints": [float(v) for k in kps for v in k]})  # fmt: skip
                    pck[kind] += _pck(persons, found)
        # GCG-box: the record's first grounded caption
        captions = [c for c in record.captions if c.phrases and all(o in by_id for p in c.phrases for o in p.objects)]
        grounded = caption_item(record, captions[0]) if captions else None
        if grounded is not None:
            truth = [(g.name, t.box) for g in grounded.groups for t in g.targets]
            for mode, decoded in ask(encoded, grounded).items():
                gcg[mode].append((truth, [(o.phrase, o.box) for o in perceiver.objects(decoded, frame)]))
        # FOVD, scored by mAP_S
        things = whole_instances(record)
        if things:
            for inst in things:
                cid = det_categories.setdefault(inst.category, len(det_categories) + 1)
                x0, y0, x1, y1 = inst.box
                det_gt.append({"id": len(det_gt) + 1, "image_id": image_id, "category_id": cid, "iscrowd": 0,
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})  # fmt: skip
            t0 = time.perf_counter()
            decoded = perceiver.generate(encoded, everything_item(record, things).question, [])
            seconds, questions = seconds + time.perf_counter() - t0, questions + 1
            answers["clean"].append(not decoded.problems)
            answers["count"].append(len(decoded.ref_units) == len(things))
            for o in perceiver.objects(decoded, frame):
                det_results.append({"image_id": image_id, "phrase": o.phrase, "bbox": [o.box[0], o.box[1],
                                    o.box[2] - o.box[0], o.box[3] - o.box[1]]})  # fmt: skip

    mean = lambda v: float(np.mean(v)) if len(v) else None  # noqa: E731
    measured: dict[str, dict] = {}
    for mode in MODES:
        r = ref[mode]
        domains = sorted({d for d, _ in r["domain"]})
        per_domain = {d: mean([s for k, s in r["domain"] if k == d]) for d in domains}
        seg = referring.segmentation_iou(r["res_gt"], r["res_pred"]) if r["res_gt"] else {"cIoU": None, "gIoU": None}
        rec = referring.rec_accuracy(r["rec_gt"], r["rec_pred"]) if r["rec_gt"] else None
        scores: dict[str, object] = {"REC Acc@0.5": rec,
             **{f"REC Acc@0.5 ({readout} box readout)": referring.rec_accuracy(r["rec_gt"], r[f"rec_{readout}"])
                if r["rec_gt"] else None for readout in BOX_READOUTS},
             "RES cIoU": seg["cIoU"], "RES gIoU": seg["gIoU"],
             "multi-instance DF1@0.5": mean([v for v in per_domain.values() if v is not None]),
             "rejection accuracy": mean(r["rejected"]),
             "DF1@0.5 by domain": per_domain,
             "DF1@0.5 by answer count": {b: mean([s for k, s in r["bucket"] if k == b])
                                         for b in ("1", "2-5", "6-10", ">10")}}  # fmt: skip
        for key, value in gcg_scores(gcg[mode]).items():
            scores[f"GCG {key}"] = value
        for kind in PROMPT_KINDS:
            pairs = ig[mode][kind]
            iou = referring.segmentation_iou([g for g, _ in pairs], [p for _, p in pairs]) if pairs else {}
            scores[f"IG mIoU ({kind})"] = iou.get("gIoU")
            scores[f"IG cIoU ({kind})"] = iou.get("cIoU")
        measured[mode] = scores
    kp_ap: dict[str, dict] = {}
    if kp_gt:
        gt = COCO()
        gt.dataset = {"images": kp_images, "annotations": kp_gt,
                      "categories": [{"id": 1, "name": "person", "keypoints": [], "skeleton": []}]}  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
        kp_ap = {m: keypoint_ap(gt, res) for m, res in kp_results.items()}
    pck_of = {m: (sum(h for h, _ in v) / max(1, sum(t for _, t in v))) if v else None for m, v in pck.items()}
    for mode in MODES:
        measured[mode]["keypoint OKS AP"] = kp_ap[mode]["AP"] if kp_ap else None
        measured[mode]["PCK@0.1"] = pck_of[mode]
    map_s = {"mAP_S": None, "mAP_S50": None}
    if det_gt:
        coco = COCO()
        coco.dataset = {"images": kp_images, "annotations": det_gt,
                        "categories": [{"id": k, "name": n} for n, k in det_categories.items()]}  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        map_s = text.map_s(coco, det_results)
    generated = measured["generated"]
    generated["answers parse cleanly"] = mean(answers["clean"])
    generated["answers with the right <REF> count"] = mean(answers["count"])
    baseline_ap = kp_ap["template baseline"]["AP"] if kp_ap else None
    metrics = {**generated, "teacher-forced": measured["teacher-forced"], "mAP_S": map_s["mAP_S"],
               "mAP_S AP50": map_s["mAP_S50"], "keypoint template baseline OKS AP": baseline_ap,
               "keypoint template baseline PCK@0.1": pck_of["template baseline"], "records": len(records),
               "questions": questions, "seconds per question": seconds / max(1, questions)}  # fmt: skip
    met = lambda k, t: "-" if generated.get(k) is None else ("yes" if generated[k] >= t else "no")  # noqa: E731
    rows = [[k, t, generated.get(k), measured["teacher-forced"].get(k), met(k, t)] for k, t in TARGETS.items()]
    tables = [
        Table("Targets (generated answers; teacher-forced beside)", ["measure", "target", "generated",
                                                                     "teacher-forced", "met"], rows),
        Table("Interactive grounding", ["prompt", "mIoU", "cIoU", "mIoU teacher-forced"],
              [[k, generated[f"IG mIoU ({k})"], generated[f"IG cIoU ({k})"],
                measured["teacher-forced"][f"IG mIoU ({k})"]] for k in PROMPT_KINDS]),
        Table("Keypoints", ["", "OKS AP", "AP50", "PCK@0.1"],
              [[m, kp_ap[m]["AP"] if kp_ap else None, kp_ap[m]["AP50"] if kp_ap else None, pck_of[m]]
               for m in (*MODES, "template baseline")]),
        Table("Referring DF1@0.5 by answer count", ["", "1", "2-5", "6-10", ">10"],
              [[m, *measured[m]["DF1@0.5 by answer count"].values()] for m in MODES]),
        Table("Grounded captions (GCG-box)", ["", "AP50", "mIoU", "recall"],
              [[m, measured[m]["GCG AP50"], measured[m]["GCG mIoU"], measured[m]["GCG recall"]] for m in MODES]),
        Table("Open-vocabulary detection (mAP_S)", ["mAP_S", "mAP_S50"], [[map_s["mAP_S"], map_s["mAP_S50"]]]),
    ]  # fmt: skip
    notes = [f"{len(records)} {name} records, {questions} generated answers, {metrics['seconds per question']:.3f} s "
             f"per answer (grammar-constrained greedy decoding, then the decoders)",
             "teacher-forced: the decoders read the <REF> states of the true answer (what they achieve given the "
             "right words)"]  # fmt: skip
    return Report(f"REF-VLM benchmark ({name})", metrics, tables, notes)


def _pck(persons, found) -> list[tuple[int, int]]:
    """Each true person's PCK@0.1 hits, against the unused found person whose box overlaps it most (IoU >= 0.5)."""
    used: set[int] = set()
    out = []
    for p in persons:
        best, best_iou = None, 0.5
        for j, (box, _, _) in enumerate(found):
            iou = pair_iou(p.box, box)
            if j not in used and iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
        out.append(pck_hits(p.keypoints or [], None if best is None else found[best][1], p.box))
    return out
