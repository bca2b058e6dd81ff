"""``perceive benchmark --data SPEC``: a retrieval model over annotation files, the measures the data supports.

Measures are per source (a data spec's sources are the columns of ChatRex's Tab. 2: COCO, LVIS, RefCOCO, ...).
The model sees its own UPN proposals of one granularity (never ground truth), each with its score; an answer's
object has the confidence of ``ChatRexPerceiver.answer``: its proposal's score times its index's probability.

- **Detection** (ChatRex Sec. 5.1: "we provide all ground truth categories for the current test image"): a
  record is asked about every category of its non-crowd instances, whole objects and parts alike, in ChatRex's
  grounding template ("Please detect a; b; c in this image. ..."), ``categories_per_question`` (3) categories
  a question in name order, since the tiny recipe trains on one to three phrases a question and the paper does
  not say how many it asks at once. Only records whose labelling is exhaustive are asked
  (``detection_categories``). Each object grounded to an asked phrase is a detection of that category.
  *Ours*: P@0.5 / R@0.5 micro-averaged over every object (``detection.precision_recall``) and COCO box AP
  (pycocotools, from the objects' confidences, at most 100 per image as COCO counts).
  *The maintainers'* (IDEA-Research/ChatRex issue 3): P@0.5 / R@0.5 per category, averaged over categories,
  of the objects scoring at least ``score_threshold`` (0.3; ``detection.per_category_precision_recall`` states
  the rule), beside the micro-averaged P / R and the AP of the same objects. Their ChatRex drops proposals
  under 0.3 before asking (issue 19) and scores an object by its proposal alone (Sec. 5.1), so their threshold
  keeps at least the objects ours keeps.
  LVIS: a record does not say which of its present categories the image is not exhaustively labelled for
  (``not_exhaustive_category_ids``), so an unlabelled object of such a category that the model finds counts as
  a false detection, where LVIS's evaluation ignores it: precision on LVIS is a lower bound, and the AP is
  COCO's, not LVIS's federated AP.
- **REC Acc@0.5** (RefCOCO/+/g): every expression with exactly one answer instance, asked alone; right when
  the answer's first object's box has IoU >= 0.5 with the instance's (``referring.rec_accuracy``).
- **HumanRef** R / P / DF1 at IoU 0.5 by domain, and rejection accuracy (``referring.humanref``): every
  expression of a record whose expressions have a domain or several or no answers (HumanRef's kind), asked
  alone; all the answer's objects are the prediction; an expression without a domain counts under
  "unspecified".
- **Proposals**: recall at IoU 0.5 of the non-crowd instances (whole objects and parts apart) by the UPN's
  coarse, fine and both sets, whichever the questions are asked with (``--granularity``). ChatRex's reported
  numbers use the fine prompt (issue 19), whose training set (SA-1B) has whole objects too; a UPN trained on
  the world's instances and parts finds parts only with it.

A record whose image cannot be read, or whose image is not the size its annotation says, is counted, named in
the report's notes and skipped.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from perceive.answer import Answer
from perceive.boxes import box_iou, rle_area
from perceive.data.readers import HumanRefSample
from perceive.data.records import AttributeSchema, Expression, ImageRecord, Instance
from perceive.data.sources import Skipped, Source
from perceive.data.templates import CHATREX_TEMPLATES, PHRASE_SEPARATOR
from perceive.eval import detection, referring
from perceive.eval.report import Report, Table

# ChatRexPerceiver.propose's choices (its PROPOSAL_GRANULARITIES; not imported, so that a test's stand-in model
# needs no transformers)
GRANULARITIES = ("coarse", "fine", "both")
SCORE_THRESHOLD = 0.3  # the maintainers' (IDEA-Research/ChatRex issue 3)
CATEGORIES_PER_QUESTION = 3
UNSPECIFIED_DOMAIN = "unspecified"
MAX_NAMED_SKIPS = 10  # unreadable images named in the report's notes (all are in its JSON)


class Benchmarked(Protocol):
    """What the benchmark asks of a model: ChatRexPerceiver's ``propose`` and ``ask_batch``."""

    def propose(self, image: np.ndarray, granularity: str = "both") -> tuple[np.ndarray, np.ndarray]: ...

    def ask_batch(
        self, images: list, questions: list[str], *, boxes: list | None = None, scores: list | None = None,
        force_phrases: bool = True,
    ) -> list[Answer]: ...  # fmt: skip


class RecordList(Source):
    """Records in memory as a source (a test's hand-made records, the world's scenes)."""

    def __init__(self, name: str, records: Sequence[ImageRecord], schema: AttributeSchema | None = None) -> None:
        self.name = name
        self.records = list(records)
        self.schema = schema or AttributeSchema()
        self.skipped = Skipped()

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> ImageRecord:
        return self.records[index]


def detection_categories(record: ImageRecord) -> list[str]:
    """The categories ``record`` is asked to detect, in name order: those of its non-crowd instances. Empty when
    its labelling is not known to be exhaustive, that is when it names no category as absent
    (``negative_categories``: COCO every category, LVIS its verified ones, the world its things) and it has
    referring expressions: a RefCOCO or HumanRef image labels what its expressions are about, so every other
    object the model found would count as a false detection."""
    if not record.negative_categories and record.expressions:
        return []
    return sorted({i.category for i in record.instances if not i.iscrowd})


def is_humanref_style(record: ImageRecord) -> bool:
    """Whether ``record``'s expressions are HumanRef's kind: one has a domain, or several or no answers."""
    return any(e.domain or len(e.answer) != 1 for e in record.expressions)


@dataclass
class _Query:
    slot: int  # the record's place in its window
    question: str
    phrases: list[str] = field(default_factory=list)  # a detection question's categories
    expression: Expression | None = None  # a referring question's
    key: str = ""  # the expression's sample id


@dataclass
class _Loaded:
    record: ImageRecord
    image: np.ndarray
    proposals: dict[str, tuple[np.ndarray, np.ndarray]]  # granularity -> boxes, scores
    image_id: int | None  # its COCO image id when it is asked detection questions


@dataclass
class _Tally:
    """What one source's records add up to."""

    name: str
    records: int = 0
    images: int = 0
    coco_images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    category_ids: dict[str, int] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)
    detection_questions: int = 0
    rec_truth: list[list[float]] = field(default_factory=list)
    rec_predictions: list[list[float] | None] = field(default_factory=list)
    samples: list[HumanRefSample] = field(default_factory=list)
    predictions: dict[str, list[list[float]]] = field(default_factory=dict)
    # granularity -> "instance" / "part" -> [found, total]
    proposal_hits: dict[str, dict[str, list[int]]] = field(
        default_factory=lambda: {g: {"instance": [0, 0], "part": [0, 0]} for g in GRANULARITIES}
    )
    proposal_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GRANULARITIES, 0))
    skipped: Skipped = field(default_factory=Skipped)
    skipped_names: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped.add(reason, where)
        self.skipped_names.append(f"{where}: {reason}")

    def category_id(self, name: str) -> int:
        return self.category_ids.setdefault(name, len(self.category_ids) + 1)


def _xywh(box: Sequence[float]) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def _area(inst: Instance, width: int, height: int) -> float:
    """The instance's mask area (COCO's ``area``, by which AP small / medium / large are split), its box's
    where it has no mask or the mask does not decode."""
    x0, y0, x1, y1 = inst.box
    box_area = float((x1 - x0) * (y1 - y0))
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError):
        if isinstance(inst.mask, dict):
            return float(rle_area(inst.mask))
        if isinstance(inst.mask, list) and inst.mask:
            from pycocotools import mask as coco_mask

            polygons = [[float(v) for v in p] for p in inst.mask]
            return float(coco_mask.area(coco_mask.merge(coco_mask.frPyObjects(polygons, height, width))))
    return box_area


def _load(source: Source, index: int, tally: _Tally) -> tuple[ImageRecord, np.ndarray] | None:
    """Record ``index`` and its pixels, or None (counted and named) when either cannot be had."""
    try:
        record = source.record(index)
    except (OSError, ValueError, KeyError) as e:
        tally.skip("unreadable record", f"{tally.name} record {index}: {e}")
        return None
    where = f"{tally.name}:{record.key}"
    try:
        image = record.image()
    except (OSError, ValueError) as e:  # the error names the file
        tally.skip("unreadable image", f"{where}: {e}")
        return None
    if image.shape[:2] != (record.height, record.width):
        tally.skip("image not the annotated size", f"{where}: {record.path or 'the image'} is {image.shape[1]}x"
                   f"{image.shape[0]}, the annotation says {record.width}x{record.height}")  # fmt: skip
        return None
    return record, image


def _names(sources: list[Source]) -> list[str]:
    """Each source's name in the report, made unique by its place in the spec where two share one (COCO and
    Objects365 are both "coco")."""
    names = [s.name or "source" for s in sources]
    return [n if names.count(n) == 1 else f"{n} (source {k})" for k, n in enumerate(names)]


def _count_proposals(tally: _Tally, record: ImageRecord, proposals: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    targets = [i for i in record.instances if not i.iscrowd]
    truth = torch.tensor([i.box for i in targets], dtype=torch.float64).reshape(-1, 4)
    for granularity, (boxes, _) in proposals.items():
        tally.proposal_counts[granularity] += len(boxes)
        found = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
        best = box_iou(truth, found).max(dim=1).values if len(found) else torch.zeros(len(targets))
        for inst, iou in zip(targets, best.tolist(), strict=True):
            hits = tally.proposal_hits[granularity]["part" if inst.granularity == "part" else "instance"]
            hits[0] += iou >= 0.5
            hits[1] += 1


def _prepare(perceiver: Benchmarked, tally: _Tally, record: ImageRecord, image: np.ndarray) -> _Loaded:
    """A readable record's proposals at every granularity (their recall counted) and, when it is asked detection
    questions, its image and instances entered in the source's COCO ground truth."""
    tally.images += 1
    proposals = {g: perceiver.propose(image, granularity=g) for g in GRANULARITIES}
    _count_proposals(tally, record, proposals)
    if not detection_categories(record):
        return _Loaded(record, image, proposals, None)
    image_id = len(tally.coco_images) + 1
    tally.coco_images.append({"id": image_id, "width": record.width, "height": record.height})
    tally.annotations += [
        {"id": len(tally.annotations) + k + 1, "image_id": image_id, "category_id": tally.category_id(inst.category),
         "bbox": _xywh(inst.box), "area": _area(inst, record.width, record.height), "iscrowd": int(inst.iscrowd)}
        for k, inst in enumerate(record.instances)
    ]  # fmt: skip
    return _Loaded(record, image, proposals, image_id)


def _queries(loaded: _Loaded, slot: int, per_question: int) -> list[_Query]:
    record = loaded.record
    out = []
    if loaded.image_id is not None:
        categories = detection_categories(record)
        for j in range(0, len(categories), per_question):
            chunk = categories[j : j + per_question]
            out.append(_Query(slot, CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(chunk)), chunk))
    for k, e in enumerate(record.expressions):
        question = CHATREX_TEMPLATES["detect"].format(obj=e.text)
        out.append(_Query(slot, question, expression=e, key=f"{record.key}#{k}"))
    return out


def _score(tally: _Tally, loaded: _Loaded, query: _Query, answer: Answer) -> None:
    record = loaded.record
    if query.expression is None:  # detection
        assert loaded.image_id is not None
        for found in answer.objects:
            if found.phrase in query.phrases:
                tally.results.append({"image_id": loaded.image_id, "category_id": tally.category_id(found.phrase),
                                      "bbox": _xywh(found.box), "score": float(found.score)})  # fmt: skip
        return
    e = query.expression
    boxes = {i.id: i.box for i in record.instances}
    unknown = [a for a in e.answer if a not in boxes]
    if unknown:
        tally.skip("expression names an unknown instance", f"{tally.name}:{record.key}: {e.text!r} -> {unknown}")
        return
    truth = [list(boxes[a]) for a in e.answer]
    if len(truth) == 1:
        tally.rec_truth.append(truth[0])
        tally.rec_predictions.append(list(answer.objects[0].box) if answer.objects else None)
    if is_humanref_style(record):
        domain = e.domain or UNSPECIFIED_DOMAIN
        tally.samples.append(HumanRefSample(query.key, record.key, e.text, [], truth, domain, e.sub_domain))
        tally.predictions[query.key] = [list(o.box) for o in answer.objects]


def _coco(tally: _Tally) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": tally.coco_images,
        "annotations": tally.annotations,
        "categories": [{"id": i, "name": n} for n, i in tally.category_ids.items()],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    return coco


def _measure(tally: _Tally, score_threshold: float) -> dict:
    """The source's measures, each only where the data supports it."""
    out: dict[str, Any] = {"records": tally.records, "images": tally.images, "skipped": tally.skipped.counts,
                           "skipped_images": tally.skipped_names}  # fmt: skip
    if tally.coco_images:
        gt = _coco(tally)
        names = {i: n for n, i in tally.category_ids.items()}
        kept = [r for r in tally.results if r["score"] >= score_threshold]
        per_category = detection.per_category_precision_recall(gt, tally.results, score_threshold=score_threshold)
        per_category["by_category"] = {names[i]: v for i, v in per_category["by_category"].items()}
        ap = detection.coco_ap(gt, tally.results)
        out["detection"] = {
            "images": len(tally.coco_images),
            "questions": tally.detection_questions,
            "ours": {**detection.precision_recall(gt, tally.results), "AP": {k: v for k, v in ap.items()
                                                                              if k != "pr_curve"}},
            "maintainers": {"per_category": per_category, "micro": detection.precision_recall(gt, kept),
                            "AP": {k: v for k, v in detection.coco_ap(gt, kept).items() if k != "pr_curve"}},
        }  # fmt: skip
    if tally.rec_truth:
        out["rec"] = {"Acc@0.5": referring.rec_accuracy(tally.rec_truth, tally.rec_predictions),
                      "expressions": len(tally.rec_truth)}  # fmt: skip
    if tally.samples:
        ref = referring.humanref(tally.samples, tally.predictions)
        out["humanref"] = {**ref.to_json(), "by_sub_domain": ref.by_sub_domain, "counts": ref.counts}
    if tally.images and any(h[1] for h in tally.proposal_hits["both"].values()):
        out["proposals"] = {
            g: {
                "boxes per image": tally.proposal_counts[g] / tally.images,
                **{f"R@0.5 {kind}s": hits[0] / hits[1] for kind, hits in tally.proposal_hits[g].items() if hits[1]},
            }
            for g in GRANULARITIES
        }
    return out


def run(
    perceiver: Benchmarked,
    sources: Iterable[Source],
    n: int | None = None,
    granularity: str = "both",
    score_threshold: float = SCORE_THRESHOLD,
    categories_per_question: int = CATEGORIES_PER_QUESTION,
    batch_size: int = 16,
    progress: bool = True,
    force_phrases: bool = True,
) -> Report:
    """Benchmark ``perceiver`` on every record of ``sources`` (the first ``n`` of each, if given): the module's
    measures, per source, as a report whose ``metrics`` are ``{"sources": {name: measures}, ...}``.
    ``granularity`` chooses the proposals the questions are asked with."""
    from tqdm import tqdm

    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
    if categories_per_question < 1 or batch_size < 1:
        raise ValueError("categories_per_question and batch_size must be at least 1")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    sources = list(sources)
    tallies = [_Tally(name) for name in _names(sources)]
    total = sum(len(s) if n is None else min(n, len(s)) for s in sources)
    bar = tqdm(total=total, desc="benchmark", unit="image", disable=not progress)
    t0, questions = time.perf_counter(), 0
    for source, tally in zip(sources, tallies, strict=True):
        count = len(source) if n is None else min(n, len(source))
        for first in range(0, count, batch_size):  # a window of records at a time: images are not all kept
            window: list[_Loaded] = []
            for index in range(first, min(count, first + batch_size)):
                tally.records += 1
                got = _load(source, index, tally)
                if got is None:
                    continue
                window.append(_prepare(perceiver, tally, *got))
            queries = [q for slot, loaded in enumerate(window) for q in _queries(loaded, slot, categories_per_question)]
            tally.detection_questions += sum(q.expression is None for q in queries)
            for j in range(0, len(queries), batch_size):
                part = queries[j : j + batch_size]
                chosen = [window[q.slot].proposals[granularity] for q in part]
                answers = perceiver.ask_batch(
                    [window[q.slot].image for q in part], [q.question for q in part],
                    boxes=[b for b, _ in chosen], scores=[s for _, s in chosen], force_phrases=force_phrases,
                )  # fmt: skip
                for q, answer in zip(part, answers, strict=True):
                    _score(tally, window[q.slot], q, answer)
            questions += len(queries)
            bar.update(min(count, first + batch_size) - first)
    bar.close()
    seconds = time.perf_counter() - t0
    measured = {t.name: _measure(t, score_threshold) for t in tallies}
    metrics = {
        "sources": measured,
        "granularity": granularity,
        "score_threshold": score_threshold,
        "categories_per_question": categories_per_question,
        "questions": questions,
        "seconds": seconds,
        "reading": {t.name: s.skipped.summary() for s, t in zip(sources, tallies, strict=True) if s.skipped.total},
    }
    return Report("perceive benchmark: annotation files", metrics, _tables(measured, granularity, score_threshold),
                  _notes(metrics, sources, tallies))  # fmt: skip


def _tables(measured: dict[str, dict], granularity: str, threshold: float) -> list[Table]:
    tables = []
    has_detection = any("detection" in m for m in measured.values())
    has_rec = any("rec" in m for m in measured.values())
    if has_detection or has_rec:
        headers, rows = ["source", "images"], []
        if has_detection:
            headers += ["P@0.5", "R@0.5", "mAP", "AP50"]
        if has_rec:
            headers += ["REC Acc@0.5", "expressions"]
        for name, m in measured.items():
            if "detection" not in m and "rec" not in m:
                continue
            row: list[object] = [name, m["images"]]
            if has_detection:
                d = m.get("detection", {}).get("ours")
                row += [d["P@0.5"], d["R@0.5"], d["AP"]["AP"], d["AP"]["AP50"]] if d else [None] * 4
            if has_rec:
                r = m.get("rec")
                row += [r["Acc@0.5"], r["expressions"]] if r else [None, None]
            rows.append(row)
        title = (f"ChatRex Tab. 2 (ours: P / R micro-averaged over every object, AP from their confidences; "
                 f"{granularity} proposals)")  # fmt: skip
        tables.append(Table(title, headers, rows))
    if has_detection:
        rows = []
        for name, m in measured.items():
            if "detection" in m:
                d = m["detection"]["maintainers"]
                c = d["per_category"]
                rows.append([name, c["P@0.5"], c["R@0.5"], c["categories"], d["micro"]["P@0.5"], d["micro"]["R@0.5"],
                             d["AP"]["AP"]])  # fmt: skip
        headers = ["source", "P@0.5 per category", "R@0.5 per category", "categories", "P@0.5 micro", "R@0.5 micro",
                   "mAP"]  # fmt: skip
        tables.append(Table(f"the maintainers' protocol (objects scoring >= {threshold:g}; P / R per category, "
                            f"averaged over categories, and micro-averaged)", headers, rows))  # fmt: skip
    humanref_rows = []
    for name, m in measured.items():
        h = m.get("humanref")
        if h is None:
            continue
        counts = h["counts"]
        for domain, v in h.items():
            if domain in ("all", "rejection", "by_sub_domain", "counts"):
                continue
            humanref_rows.append([name, domain, counts.get(f"domain:{domain}", 0), v["R@0.5"], v["P@0.5"],
                                  v["DF1@0.5"], None])  # fmt: skip
        if counts.get("samples"):
            a = h["all"]
            humanref_rows.append([name, "all", counts["samples"], a["R@0.5"], a["P@0.5"], a["DF1@0.5"], None])
        if h["rejection"]["total"]:
            humanref_rows.append([name, "rejection", h["rejection"]["total"], None, None, None, h["rejection"]["rate"]])
    if humanref_rows:
        headers = ["source", "domain", "n", "R@0.5", "P@0.5", "DF1@0.5", "rejection accuracy"]
        tables.append(Table("HumanRef by domain (R / P / DF1 at IoU 0.5; rejection: answered with no box)", headers,
                            humanref_rows))  # fmt: skip
    proposal_rows = []
    for name, m in measured.items():
        for g, v in m.get("proposals", {}).items():
            label = g + (" (asked with)" if g == granularity else "")
            proposal_rows.append([name, label, f"{v['boxes per image']:.1f}", v.get("R@0.5 instances"),
                                  v.get("R@0.5 parts")])  # fmt: skip
    if proposal_rows:
        headers = ["source", "UPN granularity", "boxes per image", "R@0.5 whole objects", "R@0.5 parts"]
        tables.append(Table("proposals (recall at IoU 0.5 of the non-crowd instances)", headers, proposal_rows))
    return tables


def _notes(metrics: dict, sources: list[Source], tallies: list[_Tally]) -> list[str]:
    notes = [
        f"{sum(t.images for t in tallies)} images of {len(tallies)} sources, {metrics['questions']} questions in "
        f"{metrics['seconds']:.0f} s; {metrics['granularity']} UPN proposals with their scores; detection asks "
        f"every category of an exhaustively labelled image, {metrics['categories_per_question']} a question; "
        f"REC Acc@0.5 is the same in both protocols",
    ]
    for source, tally in zip(sources, tallies, strict=True):
        m = metrics["sources"][tally.name]
        if not any(k in m for k in ("detection", "rec", "humanref")) and tally.images:
            notes.append(f"{tally.name}: nothing to measure (no exhaustively labelled instances, no expressions)")
        if source.skipped.total:
            notes.append(f"{tally.name} when read: {source.skipped.summary()}")
        if tally.skipped.total:
            named = "; ".join(tally.skipped_names[:MAX_NAMED_SKIPS])
            more = len(tally.skipped_names) - MAX_NAMED_SKIPS
            notes.append(f"{tally.name}: {tally.skipped.total} of {tally.records} records skipped: {named}"
                         + (f"; and {more} more (benchmark.json names them all)" if more > 0 else ""))  # fmt: skip
    return notes
