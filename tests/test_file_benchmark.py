"""``perceive benchmark --data``: the maintainers' per-category protocol against hand-computed values, every
measure on hand-made records answered by a scripted model, unreadable images skipped and named, the shipped
model over world scenes turned into records, and the UPN's granularities."""

import contextlib
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import perceive
from perceive import cli
from perceive.answer import Answer, GroundedObject
from perceive.boxes import box_iou
from perceive.data.records import Expression, ImageRecord, Instance
from perceive.data.sources.world import scene_record
from perceive.eval import detection, file_benchmark
from perceive.eval.file_benchmark import RecordList
from perceive.eval.report import markdown
from perceive.models.chatrex.perceiver_chatrex import grounding_phrases
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import describe

WORLD = WorldConfig(size=256, person_share=0.35, relation_depth=2)


def _coco(images: list[int], annotations: list[tuple[int, int, list[float], bool]]):
    """A pycocotools ground truth: (image id, category id, xyxy box, crowd) per annotation."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100} for i in images],
        "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                         "area": (b[2] - b[0]) * (b[3] - b[1]), "iscrowd": int(crowd)}
                        for k, (i, c, b, crowd) in enumerate(annotations)],
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3, 4)],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _result(image: int, category: int, box: list[float], score: float) -> dict:
    return {"image_id": image, "category_id": category, "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
            "score": score}  # fmt: skip


A1, A2, A3, B1, CROWD = [0, 0, 10, 10], [20, 0, 30, 10], [0, 0, 10, 10], [0, 20, 10, 30], [50, 50, 60, 60]


def test_the_per_category_protocol_by_hand():
    """Category 1: three objects; category 2: one, and a crowd. Scores around 0.3 decide what is kept."""
    gt = _coco([1, 2], [(1, 1, A1, False), (1, 1, A2, False), (2, 1, A3, False), (1, 2, B1, False),
                        (2, 2, CROWD, True)])  # fmt: skip
    results = [
        _result(1, 1, A1, 0.9),  # kept, a match
        _result(1, 1, A2, 0.29),  # dropped though it would match
        _result(1, 1, [40, 40, 50, 50], 0.3),  # kept (0.3 is not under 0.3), a false detection
        _result(2, 1, A3, 0.2),  # dropped
        _result(1, 2, B1, 0.31),  # kept, a match
        _result(1, 2, B1, 0.5),  # kept, the same object again: one to one, so false
        _result(2, 2, CROWD, 0.8),  # kept; a crowd is no target
    ]
    out = detection.per_category_precision_recall(gt, results, score_threshold=0.3)
    # category 1: 1 match of 2 kept, of 3 objects; category 2: 1 match of 3 kept, of 1 object
    assert out["by_category"][1] == {"P@0.5": 1 / 2, "R@0.5": 1 / 3, "matches": 1, "predictions": 2, "ground_truth": 3}
    assert out["by_category"][2] == {"P@0.5": 1 / 3, "R@0.5": 1.0, "matches": 1, "predictions": 3, "ground_truth": 1}
    assert out["P@0.5"] == pytest.approx((1 / 2 + 1 / 3) / 2) and out["R@0.5"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["categories"] == 2
    # micro-averaged over the same kept objects: 2 matches of 5 kept, of 4 objects
    micro = detection.precision_recall(gt, [r for r in results if r["score"] >= 0.3])
    assert (micro["P@0.5"], micro["R@0.5"]) == (2 / 5, 2 / 4)
    # with no threshold every result counts: category 1 gets 3 matches of 4
    every = detection.per_category_precision_recall(gt, results, score_threshold=0.0)
    assert every["by_category"][1]["R@0.5"] == 1.0 and every["by_category"][1]["P@0.5"] == 3 / 4


def test_which_categories_the_per_category_average_counts():
    """Categories with ground truth or a kept prediction enter the average, an undefined ratio counting 0; a
    category with only dropped predictions and no ground truth does not."""
    gt = _coco([1], [(1, 1, A1, False), (1, 2, B1, False)])
    results = [_result(1, 1, A1, 0.9), _result(1, 3, [70, 70, 80, 80], 0.6), _result(1, 4, [70, 70, 80, 80], 0.1)]
    out = detection.per_category_precision_recall(gt, results)
    assert sorted(out["by_category"]) == [1, 2, 3]
    assert out["by_category"][2]["P@0.5"] == 0.0 and out["by_category"][3]["R@0.5"] == 0.0
    assert out["P@0.5"] == pytest.approx(1 / 3) and out["R@0.5"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="result 0 has no score"):
        detection.per_category_precision_recall(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}])


# ---------------------------------------------------------------------------------------------------------------
# every measure on hand-made records, answered by a scripted model
# ---------------------------------------------------------------------------------------------------------------


class ScriptedPerceiver:
    """Proposals and answers written out: ``proposals[tag]`` is an image's ``(box, score, granularity)`` list and
    ``script[(tag, phrase)]`` the boxes its answer grounds to the phrase (those among the boxes given). An image's
    tag is its first pixel's value."""

    def __init__(self, proposals: dict, script: dict) -> None:
        self.proposals, self.script = proposals, script
        self.asked_with: list[list[list[float]]] = []

    def propose(self, image, granularity="both"):
        rows = [p for p in self.proposals[int(image[0, 0, 0])] if granularity in ("both", p[2])]
        return np.array([p[0] for p in rows], dtype=np.float64).reshape(-1, 4), np.array([p[1] for p in rows])

    def ask_batch(self, images, questions, *, boxes=None, scores=None, force_phrases=True):
        answers = []
        for image, question, given, given_scores in zip(images, questions, boxes, scores, strict=True):
            self.asked_with.append(np.asarray(given).tolist())
            objects = []
            for phrase in grounding_phrases(question):
                for box in self.script.get((int(image[0, 0, 0]), phrase), []):
                    k = next((k for k, b in enumerate(np.asarray(given).tolist()) if b == box), None)
                    if k is not None:
                        objects.append(GroundedObject(phrase, list(box), float(given_scores[k]), index=k))
            answers.append(Answer("", objects))
        return answers


def _image(tag: int, size: int = 64) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[0, 0, 0] = tag
    return image


def _record(tag: int, instances: list[Instance], expressions=(), negatives=("cat", "dog")) -> ImageRecord:
    return ImageRecord(f"r{tag}", 64, 64, pixels=_image(tag), instances=instances, expressions=list(expressions),
                       negative_categories=list(negatives))  # fmt: skip


CAT1, CAT2, DOG, CAT3, FALSE1, FALSE2 = [0, 0, 20, 20], [30, 30, 50, 50], [0, 40, 20, 60], [10, 10, 30, 30], \
    [40, 0, 60, 20], [40, 40, 60, 60]  # fmt: skip
LEFT, MIDDLE, RIGHT = [0, 0, 20, 40], [22, 0, 42, 40], [44, 0, 64, 40]


@pytest.fixture()
def scripted():
    coco_like = RecordList("coco-like", [
        _record(0, [Instance(1, CAT1, "cat"), Instance(2, CAT2, "cat"), Instance(3, DOG, "dog")]),
        _record(1, [Instance(1, CAT3, "cat")]),
        ImageRecord("gone", 64, 64, path=Path("/nonexistent/gone.png"), instances=[Instance(1, CAT1, "cat")]),
        ImageRecord("wrong-size", 32, 32, pixels=_image(2), instances=[Instance(1, CAT1, "cat")]),
    ])  # fmt: skip
    people = [Instance(1, LEFT, "person"), Instance(2, MIDDLE, "person"), Instance(3, RIGHT, "person")]
    refs = [Expression("left person", [1]), Expression("right person", [3]), Expression("the tall one", [1])]
    refcoco_like = RecordList("refcoco-like", [_record(3, people, refs, negatives=())])
    humanref = [
        Expression("people in red", [1, 2], "property"),
        Expression("the one holding a cup", [3], "interaction"),
        Expression("the one on a horse", [], "rejection"),
        Expression("the one with a dragon", [], "rejection"),
    ]
    humanref_like = RecordList("humanref-like", [_record(4, people, humanref, negatives=())])
    proposals = {
        0: [(CAT1, 0.9, "coarse"), (CAT2, 0.2, "fine"), (DOG, 0.8, "coarse"), (FALSE1, 0.5, "coarse")],
        1: [(CAT3, 0.6, "coarse"), (FALSE2, 0.7, "coarse")],
        2: [(CAT1, 0.9, "coarse")],
        3: [(LEFT, 0.9, "coarse"), (MIDDLE, 0.9, "coarse"), (RIGHT, 0.9, "coarse")],
        4: [(LEFT, 0.9, "coarse"), (MIDDLE, 0.9, "coarse"), (RIGHT, 0.9, "coarse")],
    }
    script = {
        (0, "cat"): [CAT1, CAT2, FALSE1], (0, "dog"): [DOG], (1, "cat"): [FALSE2],
        (3, "left person"): [LEFT], (3, "right person"): [LEFT, RIGHT],  # the first box is the answer
        (4, "people in red"): [LEFT], (4, "the one holding a cup"): [RIGHT, LEFT],
        (4, "the one with a dragon"): [MIDDLE],
    }  # fmt: skip
    return [coco_like, refcoco_like, humanref_like], ScriptedPerceiver(proposals, script)


def test_every_measure_on_hand_made_records(scripted):
    sources, model = scripted
    report = file_benchmark.run(model, sources, progress=False, batch_size=2)
    m = report.metrics["sources"]
    coco = m["coco-like"]
    # detection: cat found at CAT1 (.9), CAT2 (.2), FALSE1 (.5) and FALSE2 (.7); dog at DOG (.8); CAT3 missed
    assert coco["images"] == 2 and coco["records"] == 4 and coco["detection"]["questions"] == 2
    ours = coco["detection"]["ours"]
    assert (ours["P@0.5"], ours["R@0.5"]) == (3 / 5, 3 / 4)
    # COCO AP: dog 1; cat's detections by score TP FP FP TP of 3 objects, so precision 1 up to recall 1/3 (34
    # of 101 recall points) and 1/2 up to 2/3 (33 more); every box is exact, so every IoU threshold agrees
    assert ours["AP"]["AP"] == pytest.approx((1 + (34 + 33 / 2) / 101) / 2)
    maintainers = coco["detection"]["maintainers"]
    # under 0.3, CAT2 is dropped: cat 1 match of 3 kept, of 3 objects; dog 1 of 1
    assert maintainers["per_category"]["by_category"]["cat"]["P@0.5"] == 1 / 3
    assert maintainers["per_category"]["P@0.5"] == pytest.approx(2 / 3)
    assert maintainers["per_category"]["R@0.5"] == pytest.approx(2 / 3)
    assert (maintainers["micro"]["P@0.5"], maintainers["micro"]["R@0.5"]) == (2 / 4, 2 / 4)
    assert maintainers["AP"]["AP"] == pytest.approx((1 + 34 / 101) / 2)
    assert "rec" not in coco and "humanref" not in coco
    # proposals: CAT2's is fine, the others coarse
    assert coco["proposals"]["both"]["R@0.5 instances"] == 1.0
    assert coco["proposals"]["coarse"]["R@0.5 instances"] == 3 / 4
    assert coco["proposals"]["fine"]["R@0.5 instances"] == 1 / 4
    # unreadable and mis-sized images: counted, skipped, named
    assert coco["skipped"] == {"unreadable image": 1, "image not the annotated size": 1}
    notes = "\n".join(report.notes)
    assert "/nonexistent/gone.png" in notes and "coco-like:wrong-size" in notes and "32x32" in notes

    ref = m["refcoco-like"]  # single answers, no domains, not exhaustive: REC only
    assert ref["rec"] == {"Acc@0.5": 1 / 3, "expressions": 3}
    assert "detection" not in ref and "humanref" not in ref

    human = m["humanref-like"]["humanref"]
    assert human["property"]["R@0.5"] == 1 / 2 and human["property"]["P@0.5"] == 1.0
    assert human["property"]["DF1@0.5"] == pytest.approx(2 / 3)
    assert human["interaction"]["R@0.5"] == 1.0 and human["interaction"]["P@0.5"] == 1 / 2
    assert human["interaction"]["DF1@0.5"] == pytest.approx(1 / 3)  # F1 2/3, times 1 object / 2 predicted
    assert human["rejection"] == {"correct": 1, "total": 2, "rate": 0.5}
    assert m["humanref-like"]["rec"] == {"Acc@0.5": 1.0, "expressions": 1}  # "holding a cup": RIGHT first

    text = markdown(report)
    assert "ChatRex Tab. 2" in text and "the maintainers' protocol" in text and "HumanRef by domain" in text
    assert "| coco-like | 2 | 60.0 | 75.0 |" in text
    assert json.loads(json.dumps(report.metrics, default=float))["granularity"] == "both"


def test_questions_are_asked_with_the_chosen_granularity(scripted):
    sources, model = scripted
    report = file_benchmark.run(model, sources[:1], progress=False, granularity="coarse")
    assert [CAT2] not in model.asked_with and all(CAT2 not in boxes for boxes in model.asked_with)
    ours = report.metrics["sources"]["coco-like"]["detection"]["ours"]
    assert (ours["P@0.5"], ours["R@0.5"]) == (2 / 4, 2 / 4)  # CAT2 was not offered
    assert "coarse (asked with)" in markdown(report)
    with pytest.raises(ValueError, match="unknown granularity"):
        file_benchmark.run(model, sources, granularity="medium")


def test_only_the_measures_the_data_supports_are_printed(scripted):
    sources, model = scripted
    text = markdown(file_benchmark.run(model, sources[1:2], progress=False))
    assert "REC Acc@0.5" in text and "P@0.5" not in text and "maintainers" not in text and "HumanRef" not in text


def test_n_takes_the_first_records_of_each_source(scripted):
    sources, model = scripted
    m = file_benchmark.run(model, sources, n=1, progress=False).metrics["sources"]
    assert [v["records"] for v in m.values()] == [1, 1, 1]
    assert m["coco-like"]["detection"]["ours"]["R@0.5"] == 1.0  # record 0 alone: all three found


# ---------------------------------------------------------------------------------------------------------------
# the shipped model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    return perceive.load()


def _world_records(n: int) -> list[ImageRecord]:
    scenes = [generate_scene(987_654 + i, WORLD) for i in range(n)]
    return [scene_record(s, describe(s, WORLD)) for s in scenes]


def test_the_shipped_model_over_world_records(shipped):
    report = file_benchmark.run(shipped, [RecordList("world", _world_records(3))], progress=False)
    m = report.metrics["sources"]["world"]

    def measures(v, name=""):  # every share, by its name (a count or "boxes per image" is not one)
        if isinstance(v, dict):
            for k, x in v.items():
                yield from measures(x, str(k))
        elif name.startswith(("P@", "R@", "DF1@", "Acc@", "AP", "rate")) and v is not None:
            yield name, v

    found = list(measures({k: m[k] for k in ("detection", "rec", "humanref", "proposals")}))
    assert len(found) > 50 and all(0.0 <= v <= 1.0 for _, v in found), found
    assert m["detection"]["ours"]["R@0.5"] > 0.5 and m["detection"]["ours"]["P@0.5"] > 0.5
    assert m["images"] == 3 and m["skipped"] == {}


def test_propose_granularities_split_the_proposals(shipped):
    scene = generate_scene(987_654, WORLD)
    image = scene.image
    today = shipped.propose(image)
    both = shipped.propose(image, granularity="both")
    assert np.array_equal(today[0], both[0]) and np.array_equal(today[1], both[1])
    coarse, fine = shipped.propose(image, granularity="coarse"), shipped.propose(image, granularity="fine")
    rows = {(*b, s) for b, s in zip(*both, strict=True)}
    parts = [{(*b, s) for b, s in zip(*g, strict=True)} for g in (coarse, fine)]
    assert parts[0] and parts[1] and parts[0] <= rows and parts[1] <= rows
    assert len(coarse[0]) + len(fine[0]) == len(both[0]) and parts[0] | parts[1] == rows  # one granularity a box
    assert list(coarse[1]) == sorted(coarse[1], reverse=True)  # still best first

    def found(kind_is_part: bool, boxes: np.ndarray) -> float:  # the share of those objects a box fits
        truth = torch.tensor([o.box for o in scene.objects if (o.kind == "part") == kind_is_part], dtype=torch.float64)
        return float((box_iou(truth, torch.as_tensor(boxes)).max(dim=1).values >= 0.5).double().mean())

    # coarse is the UPN's granularity 0, whole objects; fine its granularity 1, parts
    assert found(False, coarse[0]) > 0.8 and found(True, fine[0]) > 0.8
    assert found(False, fine[0]) < 0.5 and found(True, coarse[0]) < 0.5
    with pytest.raises(ValueError, match="unknown granularity"):
        shipped.propose(image, granularity="medium")


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------


def _main(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["benchmark", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_says_when_the_data_spec_reader_is_missing(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "perceive.data.spec", None)  # import fails as if the module were not there
    code, _, err = _main(capsys, "--data", "spec.json")
    assert code == 1 and "not available yet" in err and "Traceback" not in err


def test_the_command_keeps_world_and_file_options_apart(capsys):
    code, _, err = _main(capsys, "--data", "spec.json", "--split", "validation")
    assert code == 1 and "--split chooses held-out world scenes" in err
    code, _, err = _main(capsys, "--granularity", "fine")
    assert code == 1 and "--granularity is an option of --data" in err
    code, _, err = _main(capsys, "--data", "spec.json", "--score-threshold", "2")
    assert code == 1 and "--score-threshold" in err


def test_the_command_benchmarks_a_data_spec(capsys, monkeypatch, tmp_path):
    """The command wired to ``load_spec``, here a stand-in returning the world's records as a spec would."""
    spec = types.SimpleNamespace(sources=[RecordList("world", _world_records(1))], summary=lambda: "1 source")
    calls = []

    def load_spec(path, strict=False):
        calls.append((path, strict))
        return spec

    monkeypatch.setitem(sys.modules, "perceive.data.spec", types.SimpleNamespace(load_spec=load_spec))
    code, out, err = _main(capsys, "--data", "spec.json", "--strict", "--granularity", "coarse", "--out",
                           tmp_path, "--quiet")  # fmt: skip
    assert code == 0, err
    assert calls == [("spec.json", True)]
    metrics = json.loads((tmp_path / "benchmark.json").read_text())
    assert metrics["granularity"] == "coarse" and "detection" in metrics["sources"]["world"]
    assert "ChatRex Tab. 2" in (tmp_path / "benchmark.md").read_text() and "ChatRex Tab. 2" in out


def test_the_command_on_a_world_export(capsys, tmp_path):
    pytest.importorskip("perceive.data.spec")
    from perceive.world import export

    export.write_dataset(tmp_path / "world", 1, seed=5, config=WORLD, progress=False)
    code, _, err = _main(capsys, "--data", tmp_path / "world", "--out", tmp_path / "out", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert any("detection" in m for m in metrics["sources"].values())
