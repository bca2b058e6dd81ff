"""Using a trained retrieval model: ``Perceiver.from_pretrained(dir).ask(image, question)``.

A model folder holds ``config.json`` and ``model.safetensors`` (the MLLM), the tokenizer files, and
``upn/`` (the proposal network). ``ask`` proposes boxes with the UPN (unless boxes are given), lets the
language model answer with indices, and returns the answer with every grounded object's box in the
input image's pixels and a confidence: the proposal's score times the probability of its index.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from perceive.data.tasks import PHRASE_SEPARATOR, TEMPLATES
from perceive.formats import chatrex
from perceive.images import load_image
from perceive.models.configuration_perceiver import PerceiverConfig
from perceive.models.decoding import generate
from perceive.models.modeling_perceiver import PerceiverForRetrieval
from perceive.models.modeling_upn import UpnModel, normalize_image
from perceive.processing import ImageFrame, PerceiverProcessor
from perceive.tokenization import detokenize, load_tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"


@dataclass
class GroundedObject:
    phrase: str
    index: int
    box: list[float]  # xyxy pixels of the input image
    score: float

    def to_json(self) -> dict:
        return {"phrase": self.phrase, "index": self.index, "box": [round(v, 2) for v in self.box],
                "score": round(self.score, 4)}  # fmt: skip


@dataclass
class Answer:
    text: str  # the model's answer, markup included
    objects: list[GroundedObject]
    proposals: list[dict]  # {"box": xyxy pixels, "score": float}, index k is <objk>
    problems: list[str] = field(default_factory=list)

    @property
    def plain(self) -> str:
        return chatrex.parse(self.text, len(self.proposals)).text

    def to_json(self) -> dict:
        """The documented JSON of ``perceive ask --json``."""
        out = {"answer": self.text, "objects": [o.to_json() for o in self.objects],
               "proposals": [{"box": [round(v, 2) for v in p["box"]], "score": round(p["score"], 4)}
                             for p in self.proposals]}  # fmt: skip
        if self.problems:
            out["problems"] = self.problems
        return out

    def to_coco(self, image_id: int, category_ids: dict[str, int]) -> list[dict]:
        """COCO results of the objects whose phrase names a category in ``category_ids``."""
        res = []
        for o in self.objects:
            if o.phrase in category_ids:
                x0, y0, x1, y1 = o.box
                res.append({"image_id": image_id, "category_id": category_ids[o.phrase],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": o.score})  # fmt: skip
        return res

    def draw(self, image: np.ndarray, show_proposals: bool = False):
        from perceive.draw import draw_answer

        return draw_answer(image, self, show_proposals)


class Perceiver:
    def __init__(self, model: PerceiverForRetrieval, upn: UpnModel, tokenizer) -> None:
        self.model = model.eval()
        self.upn = upn.eval()
        self.tokenizer = tokenizer
        self.processor = PerceiverProcessor(tokenizer, cast(PerceiverConfig, model.config))

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Perceiver:
        p = Path(path) if path is not None else DEFAULT_MODEL
        for need in ("config.json", "model.safetensors", "upn/config.json"):
            if not (p / need).is_file():
                raise FileNotFoundError(f"{p} is not a perceive model folder: {need} is missing")
        model = PerceiverForRetrieval.from_pretrained(str(p), use_safetensors=True)
        upn = UpnModel.from_pretrained(str(p / "upn"), use_safetensors=True)
        return cls(model, upn, load_tokenizer(p))

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def propose(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """UPN boxes (xyxy pixels of ``image``) and scores, at most ``max_objects``."""
        frame = ImageFrame(image.shape[1], image.shape[0])
        size = self.upn.config.image_size
        square = np.zeros((frame.side, frame.side, 3), dtype=np.uint8)
        square[: image.shape[0], : image.shape[1]] = image
        t = torch.from_numpy(square).permute(2, 0, 1).float()[None] / 255
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
        out = self.upn.propose(normalize_image(t), max_proposals=self.model.config.max_objects)[0]
        boxes = frame.to_pixels(out["boxes"].numpy() / size)
        return boxes, out["scores"].numpy()

    def ask(self, image, question: str, boxes=None, scores=None, max_new_tokens: int = 96) -> Answer:
        return self.ask_batch([image], [question], None if boxes is None else [boxes],
                              None if scores is None else [scores], max_new_tokens)[0]  # fmt: skip

    @torch.no_grad()
    def ask_batch(
        self,
        images: list,
        questions: list[str],
        boxes: list | None = None,
        scores: list | None = None,
        max_new_tokens: int = 96,
    ) -> list[Answer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        arrays = [load_image(im) for im in images]
        cap = self.model.config.max_objects
        per_boxes, per_scores, problems = [], [], []
        for i, arr in enumerate(arrays):
            notes = []
            if boxes is None or boxes[i] is None:
                b, s = self.propose(arr)
            else:
                b = np.asarray(boxes[i], dtype=np.float64).reshape(-1, 4)
                if not np.isfinite(b).all() or (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
                    raise ValueError("boxes must be finite [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0")
                s = np.ones(len(b)) if scores is None or scores[i] is None else np.asarray(scores[i], dtype=np.float64)
                if len(b) > cap:
                    keep = np.argsort(-s, kind="stable")[:cap]
                    notes.append(f"{len(b)} boxes given; kept the {cap} best-scoring (the model takes {cap})")
                    b, s = b[keep], s[keep]
            per_boxes.append(b)
            per_scores.append(s)
            problems.append(notes)
        frames = [ImageFrame(a.shape[1], a.shape[0]) for a in arrays]
        examples = []
        limit = self.model.config.text().max_position_embeddings - max_new_tokens
        for q, b in zip(questions, per_boxes, strict=True):
            ex = self.processor.example(q, len(b))
            if len(ex["input_ids"]) > limit:
                raise ValueError(f"the prompt is {len(ex['input_ids'])} tokens; this model takes at most {limit} "
                                 f"before its answer (shorten the question or give fewer boxes)")  # fmt: skip
            examples.append(ex)
        batch = self.processor.collate(examples, [f.normalize(b) for f, b in zip(frames, per_boxes, strict=True)],
                                       pad_left=True)  # fmt: skip
        pixels, _ = self.processor.images(arrays)
        batch.update(pixels)
        generated = generate(self.model, batch, self.tokenizer, max_new_tokens=max_new_tokens)
        answers = []
        for g, b, s, notes in zip(generated, per_boxes, per_scores, problems, strict=True):
            text = detokenize(self.tokenizer.convert_ids_to_tokens(g.token_ids))
            parsed = chatrex.parse(text, len(b))
            probs = dict(g.index_probs)
            objects = [GroundedObject(grp.phrase, k, [float(v) for v in b[k]], float(s[k]) * probs.get(k, 1.0))
                       for grp in parsed.groups for k in grp.indices]  # fmt: skip
            proposals = [{"box": [float(v) for v in box], "score": float(sc)} for box, sc in zip(b, s, strict=True)]
            answers.append(Answer(text, objects, proposals, notes + list(parsed.problems)))
        return answers

    def detect(self, image, phrases: list[str], boxes=None) -> Answer:
        """Detection / referring of one or several phrases (ChatRex's grounding template)."""
        if not phrases:
            raise ValueError("detect needs at least one phrase")
        return self.ask(image, TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(phrases)), boxes)

    def describe(self, image, box, granularity: str = "region_phrase") -> Answer:
        """A region caption of ``box`` (xyxy pixels) at a ChatRex granularity: region_category,
        region_phrase, region_brief or region_sentence. The box is given as the model's only box."""
        if granularity not in ("region_category", "region_phrase", "region_brief", "region_sentence"):
            raise ValueError(f"unknown granularity {granularity!r}")
        return self.ask(image, TEMPLATES[granularity].format(obj="<obj0>"), boxes=[list(box)])
