"""Training batches from records: the world streamed through its records gives, bit for bit, the batches it
gave before records existed (``tests/data/world_batches.json``, recorded with that code)."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from perceive.data.records import AttributeSchema, Expression, ImageRecord, Instance
from perceive.data.tasks import detect, feeds, make_qa
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.perceiver import DEFAULT_MODEL
from perceive.tokenization import load_tokenizer
from perceive.train.data import TaskStream, WorldTasks, model_options, world_model_options
from perceive.train.trainer import PERCEPTION_TASKS, build_model
from perceive.world.generator import WorldConfig

FINGERPRINTS = json.loads((Path(__file__).parent / "data" / "world_batches.json").read_text())


@pytest.fixture(scope="module")
def processor():
    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    return ChatRexProcessor(tok, build_model("tiny", tok, **world_model_options()).config)


def test_world_batches_are_bit_for_bit_those_of_before_records(processor):
    world = WorldConfig(size=128, person_share=0.35, relation_depth=2, max_objects=6)
    configs = {"perception_q4": dict(seed=2, task_weights=PERCEPTION_TASKS, refer_weights={"reasoning/negation": 2.0},
                                     questions_per_scene=4),
               "joint_q1": dict(seed=5, near_duplicates=True)}  # fmt: skip
    seen = 0
    for name, options in configs.items():
        data = WorldTasks(processor, world, **options)
        for step in (0, 3):
            batch, items = data.batch(list(range(step * 8, (step + 1) * 8)))
            for key, want in FINGERPRINTS.items():
                if key.startswith(f"{name}/{step}/") and not key.endswith("/qa"):
                    tensor = batch[key.rsplit("/", 1)[1]].contiguous()
                    assert hashlib.sha256(tensor.numpy().tobytes()).hexdigest()[:16] == want, key
                    seen += 1
            qa = json.dumps([[it.qa.question, it.qa.answer] for it in items]).encode()
            assert hashlib.sha256(qa).hexdigest()[:16] == FINGERPRINTS[f"{name}/{step}/qa"]
    assert seen == 4 * 13


class OneImage:
    """A stream of one file record, as a file source gives them."""

    kinds = None

    def __init__(self, record: ImageRecord, schema: AttributeSchema) -> None:
        self.rec, self.schema = record, schema

    def record_for(self, seed: int, index: int) -> ImageRecord:
        return self.rec


def _record() -> ImageRecord:
    pixels = np.zeros((60, 100, 3), dtype=np.uint8)  # not square: boxes are normalised by the longer side
    instances = [Instance(1, [0, 0, 20, 20], "cat"), Instance(2, [30, 5, 60, 40], "dog"),
                 Instance(3, [50, 30, 90, 58], "cat", attributes={"color": "black"}),
                 Instance(4, [0, 30, 40, 60], "person", iscrowd=True)]  # fmt: skip
    return ImageRecord("a.jpg", 100, 60, pixels=pixels, instances=instances,
                       expressions=[Expression("the black cat", [3]), Expression("the horse", [])],
                       negative_categories=["cat", "dog", "person", "horse"])  # fmt: skip


def test_a_file_record_trains_with_the_data_s_own_heads(processor):
    schema = AttributeSchema({"category": ["cat", "dog", "person", "horse"], "color": ["black", "white"]})
    options = model_options(schema)
    assert options == {"attribute_heads": {"category": 4, "color": 2}, "grid_attribute_heads": [],
                       "order_groupings": [["category"], ["category", "color"]]}  # fmt: skip
    cfg = processor.config.__class__(**{**processor.config.to_dict(), **options})
    proc = ChatRexProcessor(processor.tokenizer, cfg)
    data = TaskStream(proc, OneImage(_record(), schema), seed=1, task_weights={"detect": 1.0, "refer": 1.0})
    batch, items = data.batch(list(range(6)))
    for it in items:
        assert 4 not in it.box_objects  # a crowd is never a box to answer with
        assert np.allclose(it.boxes * 100, [_record().instance(o).box for o in it.box_objects])
        labels = {o: a for o, a in zip(it.box_objects, it.attributes, strict=True)}
        assert labels[1] == [0, -100] and labels[2] == [1, -100] and labels[3] == [0, 0]
    assert batch["attribute_labels"].shape[-1] == 2
    with pytest.raises(ValueError, match="does not label"):
        model_options(schema, ["category", "size"])
    assert model_options(AttributeSchema({"category": ["a"]}))["order_groupings"] == [["category"]]


def test_detection_never_asks_about_a_category_the_image_is_not_known_to_lack():
    record = _record()
    record.negative_categories = ["cat", "dog", "person"]  # not "horse": a federated (LVIS) image
    asked_absent = set()
    for seed in range(300):
        qa = detect(record, [1, 2, 3], random.Random(seed))
        asked_absent |= {n for n, g in zip(qa.phrases, qa.groups, strict=True) if not g}
    assert asked_absent == set()  # "person" is a crowd here, "horse" unverified: neither is taught as absent
    empty = ImageRecord("empty.jpg", 10, 10, negative_categories=["cat", "dog"])
    qa = detect(empty, [], random.Random(0))
    assert qa is not None and qa.groups == [[]] and qa.phrases[0] in ("cat", "dog")
    assert feeds(record) == ["detect", "refer"] and feeds(ImageRecord("x", 1, 1)) == []
    assert make_qa("refer", record, [3, 1], random.Random(0)) is not None


def test_chatrex_box_mixing_keeps_every_true_box_and_drops_near_copies(processor):
    schema = AttributeSchema({"category": ["cat", "dog", "person", "horse"]})
    cfg = processor.config.__class__(**{**processor.config.to_dict(), **model_options(schema)})
    proc = ChatRexProcessor(processor.tokenizer, cfg)
    record = _record()
    near_copy = [0.5, 0.0, 20.0, 20.0]  # IoU 0.975 with instance 1's box
    overlapping = [30.0, 5.0, 60.0, 30.0]  # IoU 0.71 with instance 2's: a proposal, not a copy
    elsewhere = [70.0, 0.0, 99.0, 20.0]
    proposals = np.array([near_copy, overlapping, elsewhere], dtype=np.float32)
    for mixing, kept in (("chatrex", [overlapping, elsewhere]), ("proposals_stand_in", [elsewhere])):
        data = TaskStream(proc, OneImage(record, schema), box_mixing=mixing)
        boxes, ids = data.boxes_for(record, random.Random(0), proposals)
        true = {o: b for b, o in zip(boxes.tolist(), ids, strict=True) if o is not None}
        extra = sorted(b for b, o in zip(boxes.tolist(), ids, strict=True) if o is None)
        assert sorted(true) == [1, 2, 3] and extra == sorted(kept), mixing
        if mixing == "chatrex":  # the true boxes as they are
            assert all(np.allclose(true[o], record.instance(o).box) for o in true)
        # an image with nothing labelled (a data engine's, say): every proposal is a distractor
        boxes, ids = data.boxes_for(ImageRecord("none.png", 100, 100), random.Random(0), proposals)
        assert sorted(boxes.tolist()) == sorted(proposals.tolist()) and ids == [None] * 3, mixing
    with pytest.raises(ValueError, match="box_mixing"):
        TaskStream(proc, OneImage(record, schema), box_mixing="mine")
