"""The retrieval model in use: ``ChatRexPerceiver.ask(image, question)``.

A ChatRex folder holds ``config.json`` and ``model.safetensors`` (the MLLM), the tokenizer files, and
``upn/`` (the proposal network). ``ask`` proposes boxes with the UPN (unless the user gives boxes), lets
the language model answer with indices, and returns the answer with every grounded object's box in the
input image's pixels and a confidence: the proposal's score times the probability of its index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from perceive.answer import Answer, GroundedObject
from perceive.boxes import check_pixel_boxes
from perceive.data.templates import CHATREX_TEMPLATES, PHRASE_SEPARATOR
from perceive.devices import answering, on_cpu, to_device
from perceive.formats import chatrex
from perceive.images import load_image
from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
from perceive.models.chatrex.legacy import LEGACY_MODEL_TYPE, legacy_config, load_legacy_model, migrate_key
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.chatrex.processing_chatrex import ChatRexProcessor
from perceive.models.folder_checks import (
    build_config,
    check_layer_counts,
    check_parts,
    check_pretrained_folder,
    check_token_ids,
    check_weights_fit,
    read_json_object,
    weight_shapes,
)
from perceive.models.generation import generate
from perceive.models.grammar_chatrex import ChatRexGrammar
from perceive.models.image_processing import ImageFrame, square_pixels
from perceive.models.upn.modeling_upn import UpnModel
from perceive.perceiver import ModelFolderError, Perceiver
from perceive.prompts import VisualPrompt
from perceive.tokenization import ASSISTANT, IMAGE, OBJ_TOKENS, ROI, decode_text, load_tokenizer

_GROUNDING = re.compile("^" + re.escape(CHATREX_TEMPLATES["detect"]).replace(re.escape("{obj}"), "(.+)") + "$")
# what answering reads of an image's encoding (the last two per the model's configuration)
ANSWER_INPUTS = ("image_tokens", "object_tokens", "object_order", "object_alike")
# ``propose``'s choices, in the order of the UPN's granularity labels (0 coarse, 1 fine), then both
PROPOSAL_GRANULARITIES = ("coarse", "fine", "both")


def grounding_phrases(question: str) -> list[str] | None:
    """The phrases of a question in ChatRex's grounding template ("Please detect X; Y in this image. ..."), or None."""
    m = _GROUNDING.match(question.strip())
    return [p.strip() for p in m[1].split(PHRASE_SEPARATOR.strip()) if p.strip()] if m else None


@dataclass
class EncodedImage:
    """An image with its boxes and visual tokens, ready for questions."""

    array: np.ndarray
    frame: ImageFrame
    boxes: np.ndarray  # xyxy pixels
    scores: np.ndarray
    notes: list[str]
    visual: dict[str, torch.Tensor]  # encode_visual's output for this image alone


class ChatRexPerceiver(Perceiver):
    model_type = "chatrex"

    def __init__(self, model: ChatRexForConditionalGeneration, upn: UpnModel, tokenizer) -> None:
        self.model = model.eval()
        self.upn = upn.eval()
        self.tokenizer = tokenizer
        self.processor = ChatRexProcessor(tokenizer, cast(ChatRexConfig, model.config))
        self.grammar = ChatRexGrammar(tokenizer, cast(ChatRexConfig, model.config).text().vocab_size)

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return (ChatRexConfig.model_type, LEGACY_MODEL_TYPE)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatRexPerceiver:
        """The model in ``folder``, checked before anything is built (``perceive.models.folder_checks``): the
        configurations' fields, the weights complete and shaped as the configurations describe, and a tokenizer
        whose placeholder ids are the configuration's. A folder that fails is a ``ModelFolderError`` (or
        ``FileNotFoundError``) naming the file."""
        for need in ("config.json", "model.safetensors", "upn/config.json", "upn/model.safetensors"):
            if not (folder / need).is_file():
                raise FileNotFoundError(f"{folder} is not a ChatRex model folder: {need} is missing")
        config_path, weights = folder / "config.json", folder / "model.safetensors"
        raw, shapes = read_json_object(config_path), weight_shapes(weights)
        legacy = raw.get("model_type") == LEGACY_MODEL_TYPE
        config = legacy_config(raw, shapes, config_path) if legacy else build_config(ChatRexConfig, raw, config_path)
        parts = ("vision", "convnext", "text", "upn")
        check_parts(config_path, {f"{part}_config": getattr(config, part) for part in parts})
        check_layer_counts(raw, len(shapes), config_path, weights)
        if legacy:
            shapes = {migrate_key(k): v for k, v in shapes.items()}
        check_weights_fit(lambda: ChatRexForConditionalGeneration(config), shapes, config_path, weights)
        check_pretrained_folder(folder / "upn", UpnModel)
        tokenizer = load_tokenizer(folder)
        obj_ids = config.obj_token_ids
        if len(obj_ids) > len(OBJ_TOKENS):
            raise ModelFolderError(f"{config_path}: field obj_token_ids names {len(obj_ids)} tokens; there are "
                                   f"{len(OBJ_TOKENS)} <objK> tokens")  # fmt: skip
        if not 1 <= config.max_objects <= len(obj_ids):
            raise ModelFolderError(f"{config_path}: field max_objects is {config.max_objects}, not 1 to "
                                   f"{len(obj_ids)}: each box is named by its own <objK> token, of the "
                                   f"{len(obj_ids)} in obj_token_ids")  # fmt: skip
        placeholders = [("image_token_id", config.image_token_id, IMAGE), ("roi_token_id", config.roi_token_id, ROI),
                        *((f"obj_token_ids[{k}]", i, OBJ_TOKENS[k]) for k, i in enumerate(obj_ids))]  # fmt: skip
        if config.assistant_token_id >= 0 or config.prefix_attention != "causal":  # -1: saved before the field; unread
            placeholders.append(("assistant_token_id", config.assistant_token_id, ASSISTANT))
        check_token_ids(tokenizer, config.text().vocab_size, placeholders, config_path, folder)
        if legacy:
            model = load_legacy_model(folder, config)
        else:
            model = ChatRexForConditionalGeneration.from_pretrained(str(folder), use_safetensors=True)
        upn = UpnModel.from_pretrained(str(folder / "upn"), use_safetensors=True)
        return cls(model, upn, tokenizer)

    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def propose(self, image: np.ndarray, granularity: str = "both") -> tuple[np.ndarray, np.ndarray]:
        """UPN boxes (xyxy pixels of ``image``) and scores, at most ``max_objects``, best first.

        ``granularity`` picks among them by the UPN's granularity prompt (ChatRex's two): "coarse" (whole
        objects), "fine" (parts, SA-1B-like) or "both". One granularity's boxes are those of "both" that the
        UPN labels so: the same boxes after its suppression across granularities and its cap, not a
        separate pass."""
        if granularity not in PROPOSAL_GRANULARITIES:
            raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(PROPOSAL_GRANULARITIES)}")
        frame = ImageFrame(image.shape[1], image.shape[0])
        size = self.upn.config.image_size
        # in float32 on every device, as it was trained: box regression loses too much in bf16
        found = self.upn.propose(square_pixels([image], size).to(self.device), self.model.config.max_objects)
        out = on_cpu(found[0])
        boxes, scores = frame.to_pixels(out["boxes"].numpy() / size), out["scores"].numpy()
        if granularity == "both":
            return boxes, scores
        keep = out["granularity"].numpy() == PROPOSAL_GRANULARITIES.index(granularity)
        return boxes[keep], scores[keep]

    def ask(self, image, question: str, boxes=None, prompts: list[VisualPrompt] | None = None, scores=None,
            **options) -> Answer:  # fmt: skip
        """``Perceiver.ask``; ``scores`` (with ``boxes``) are the boxes' confidences, 1 by default."""
        return self.ask_batch([image], [question], None if boxes is None else [boxes],
                              None if prompts is None else [prompts], None if scores is None else [scores],
                              **options)[0]  # fmt: skip

    def ask_batch(
        self,
        images: list,
        questions: list[str],
        boxes: list | None = None,
        prompts: list[list[VisualPrompt] | None] | None = None,
        scores: list | None = None,
        max_new_tokens: int = 96,
        force_phrases: bool = True,
    ) -> list[Answer]:
        """Answers; ``boxes[i]`` (with ``scores[i]``, default 1) replace the UPN's proposals for image i.
        The retrieval model takes no visual prompts: it points at a region through a box (``boxes`` and
        ``<obj0>`` in the question)."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if prompts is not None and any(prompts):
            raise ValueError("the ChatRex model takes no visual prompts: give the region as a box (boxes=[[x0, y0, "
                             "x1, y1]]) and name it <obj0> in the question")  # fmt: skip
        return self.answer(self.encode_batch(images, boxes, scores), questions, max_new_tokens, force_phrases)

    @torch.no_grad()
    def encode_batch(self, images: list, boxes: list | None = None, scores: list | None = None) -> list[EncodedImage]:
        """Load images, propose boxes (unless given) and run the vision and object encoders, once: the
        result answers any number of questions (``answer``) without encoding the image again."""
        arrays = [load_image(im) for im in images]
        cap = self.model.config.max_objects
        per_boxes, per_scores, notes = [], [], []
        for i, arr in enumerate(arrays):
            n: list[str] = []
            if boxes is None or boxes[i] is None:
                b, sc = self.propose(arr)
            else:
                b = check_pixel_boxes(boxes[i])
                sc = np.ones(len(b)) if scores is None or scores[i] is None else np.asarray(scores[i], dtype=np.float64)
                if sc.shape != (len(b),):
                    raise ValueError(f"{len(b)} boxes but {sc.size} scores")
                if len(b) > cap:
                    keep = np.argsort(-sc, kind="stable")[:cap]
                    n.append(f"{len(b)} boxes given; kept the {cap} best-scoring (the model takes {cap})")
                    b, sc = b[keep], sc[keep]
            per_boxes.append(b)
            per_scores.append(sc)
            notes.append(n)
        frames = [ImageFrame(a.shape[1], a.shape[0]) for a in arrays]
        pixels, _ = self.processor.images(arrays)
        norm = [f.normalize(b) for f, b in zip(frames, per_boxes, strict=True)]
        k = max(1, max(len(b) for b in norm))
        box_t = torch.zeros(len(arrays), k, 4, device=self.device)
        mask = torch.zeros(len(arrays), k, dtype=torch.bool, device=self.device)
        for i, b in enumerate(norm):
            box_t[i, : len(b)] = torch.as_tensor(b, dtype=torch.float32, device=self.device)
            mask[i, : len(b)] = True
        images = to_device([pixels["pixel_low"], pixels["pixel_high"], pixels["rgb_high"]], self.device)
        with answering(self.device):
            visual = self.model.encode_visual(*images, box_t, mask)
        return [
            EncodedImage(arr, frame, b, sc, n, {key: visual[key][i : i + 1, : None if key == "image_tokens" else len(b)]
                                                for key in ANSWER_INPUTS if key in visual})
            for i, (arr, frame, b, sc, n) in enumerate(zip(arrays, frames, per_boxes, per_scores, notes, strict=True))
        ]  # fmt: skip

    @torch.no_grad()
    def answer(
        self, encoded: list[EncodedImage], questions: list[str], max_new_tokens: int = 96, force_phrases: bool = True
    ) -> list[Answer]:
        """Answer one question per encoded image. With ``force_phrases``, a grounding question (ChatRex's
        detection template) gets its asked phrases written by the decoder and the model picks the
        indices of each (``ChatRexGrammar.plan``)."""
        if len(encoded) != len(questions):
            raise ValueError(f"{len(encoded)} images but {len(questions)} questions")
        limit = self.model.config.text().max_position_embeddings - max_new_tokens
        examples = []
        for q, enc in zip(questions, encoded, strict=True):
            ex = self.processor.example(q, len(enc.boxes))
            if len(ex["input_ids"]) > limit:
                raise ValueError(f"the prompt is {len(ex['input_ids'])} tokens; this model takes at most {limit} "
                                 f"before its answer (shorten the question or give fewer boxes)")  # fmt: skip
            examples.append(ex)
        batch = self.processor.collate(examples, [e.frame.normalize(e.boxes) for e in encoded], pad_left=True)
        batch = to_device(batch, self.device)
        k = batch["boxes"].shape[1]
        visual = {}
        for key in ANSWER_INPUTS:
            if key not in encoded[0].visual:  # per the model's configuration
                continue
            parts = [e.visual[key] for e in encoded]
            if key != "image_tokens":  # pad objects to the batch's box count
                parts = [torch.nn.functional.pad(p, (0, 0, 0, k - p.shape[1])) for p in parts]
            visual[key] = torch.cat(parts)
        batch["visual"] = visual
        phrases = [grounding_phrases(q) if force_phrases else None for q in questions]
        plans = [self.grammar.plan(self.tokenizer, p) if p else None for p in phrases]
        samples = [{"num_boxes": len(e.boxes)} for e in encoded]
        with answering(self.device):
            generated = generate(self.model.begin_decoding(batch), self.grammar, samples, max_new_tokens, plans=plans)
        answers = []
        for g, enc in zip(generated, encoded, strict=True):
            text = decode_text(self.tokenizer, g.token_ids)
            parsed = chatrex.parse(text, len(enc.boxes))
            chosen = zip(g.token_ids, g.probs, g.in_choice, strict=True)
            probs = {self.grammar.obj_index[t]: p for t, p, choice in chosen if choice and t in self.grammar.obj_index}
            objects = [GroundedObject(grp.phrase, [float(v) for v in enc.boxes[k]],
                                      float(enc.scores[k]) * probs.get(k, 1.0), index=k)
                       for grp in parsed.groups for k in grp.indices]  # fmt: skip
            proposals = [{"box": [float(v) for v in box], "score": float(sc)}
                         for box, sc in zip(enc.boxes, enc.scores, strict=True)]  # fmt: skip
            answers.append(Answer(text, objects, proposals, enc.notes + list(parsed.problems), parsed.text))
        return answers

    def detect(self, image, phrases: list[str], boxes=None) -> Answer:
        """Detection / referring of one or several phrases (ChatRex's grounding template)."""
        return self.detect_batch([image], [phrases], None if boxes is None else [boxes])[0]

    def detect_batch(self, images: list, phrases: list[list[str]], boxes: list | None = None) -> list[Answer]:
        if any(not p for p in phrases):
            raise ValueError("detect needs at least one phrase per image")
        questions = [CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(p)) for p in phrases]
        return self.ask_batch(images, questions, boxes)

    def describe(self, image, box, granularity: str = "region_phrase") -> Answer:
        """A region caption of ``box`` (xyxy pixels) at a ChatRex granularity: region_category,
        region_phrase, region_brief or region_sentence. The box is given as the model's only box."""
        return self.describe_batch([image], [box], granularity)[0]

    def describe_batch(self, images: list, boxes: list, granularity: str = "region_phrase") -> list[Answer]:
        if granularity not in ("region_category", "region_phrase", "region_brief", "region_sentence"):
            raise ValueError(f"unknown granularity {granularity!r}")
        question = CHATREX_TEMPLATES[granularity].format(obj="<obj0>")
        return self.ask_batch(images, [question] * len(images), [[list(b)] for b in boxes])
