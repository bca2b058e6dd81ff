"""MVP-LM in use: ``MvpPerceiver.ask(image, question)``.

The question is an MVP-LM instruction (``perceive.formats.mvp``): the word-based task description and a list of
names (``"Please identify all objects according to the given phrase list. This is all the candidate phrases. circle,
sky"``) or the sentence-based one and a referring sentence; a question with neither description is read as a
sentence. The model writes its caption, then ``The perception result is <PER>``; the decoder turns ``<PER>`` into
objects with a box, a score and a mask (COCO RLE) at the input image's size:

- a word list: every instance of each name (Mask2Former's instance inference: each query's best name, scored by its
  probability times the mean mask probability inside its mask, kept above ``object_threshold``);
- a sentence: every query whose target probability is above ``referring_threshold``; none above means "no target".

``panoptic(image, names)`` gives a panoptic segmentation (Mask2Former's merge; stuff comes from the stuff queries).
Duplicate names are asked once; an empty list, or names the tokenizer cannot spell, give an answer with a problem
and no objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from perceive.answer import Answer, GroundedObject
from perceive.boxes import mask_to_rle
from perceive.devices import answering, on_cpu
from perceive.formats.mvp import PER, SENTENCE_TASK, WORD_TASK, Instruction, parse_prompt, word_instruction
from perceive.images import load_image
from perceive.models.folder_checks import (
    build_config,
    check_token_ids,
    check_weights_fit,
    read_json_object,
    weight_shapes,
)
from perceive.models.generation import CACHE_ARGUMENT, output_cache
from perceive.models.image_processing import EncodedImage, ImageFrame, encode_images
from perceive.models.mvp.configuration_mvp import MvpConfig
from perceive.models.mvp.modeling_mvp import MvpForConditionalGeneration, Predictions, xyxy_boxes
from perceive.models.mvp.processing_mvp import MvpProcessor, masks_to_image
from perceive.perceiver import Perceiver
from perceive.prompts import VisualPrompt
from perceive.tokenization import IMAGE, decode_text, load_tokenizer

MAX_CAPTION_TOKENS = 40


@dataclass
class Decoded:
    """One instruction's decoding: the response text and the final prediction set (batch of one)."""

    text: str
    caption: str
    predictions: Predictions
    problems: list[str]


@dataclass
class PanopticResult:
    """``ids`` ``[H, W]`` int32 segment ids (0: no segment); ``segments``: ``{"id", "category", "isthing",
    "score"}`` each."""

    ids: np.ndarray
    segments: list[dict]


def read_instruction(question: str) -> Instruction:
    """The instruction of a question; a question with no task description is a sentence instruction."""
    text = question.strip()
    if not text.startswith((WORD_TASK, SENTENCE_TASK)):
        text = f"{SENTENCE_TASK} {text}"
    return parse_prompt(text)


class MvpPerceiver(Perceiver):
    model_type = "mvp"

    def __init__(self, model: MvpForConditionalGeneration, tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = cast(MvpConfig, model.config)
        self.processor = MvpProcessor(tokenizer, self.config)

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return (MvpConfig.model_type,)

    @classmethod
    def from_folder(cls, folder: Path) -> MvpPerceiver:
        """The model in ``folder``, checked before it is built: the configuration's fields, the weights complete and
        shaped as it describes, a tokenizer whose ``<image>`` and ``<PER>`` ids are the configuration's."""
        for need in ("config.json", "model.safetensors"):
            if not (folder / need).is_file():
                raise FileNotFoundError(f"{folder} is not an MVP-LM model folder: {need} is missing")
        config_path, weights = folder / "config.json", folder / "model.safetensors"
        config = build_config(MvpConfig, read_json_object(config_path), config_path)
        check_weights_fit(lambda: MvpForConditionalGeneration(config), weight_shapes(weights), config_path, weights)
        tokenizer = load_tokenizer(folder)
        placeholders = [("image_token_id", config.image_token_id, IMAGE), ("per_token_id", config.per_token_id, PER)]
        check_token_ids(tokenizer, config.text().vocab_size, placeholders, config_path, folder)
        model = MvpForConditionalGeneration.from_pretrained(str(folder), use_safetensors=True)
        return cls(model, tokenizer)

    # -- encoding and decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_batch(self, images: list, boxes: list | None = None) -> list[EncodedImage]:
        return encode_images(images, self.processor, self.model)

    @torch.no_grad()
    def decode(self, encoded: EncodedImage, instruction: Instruction) -> Decoded:
        """Write the caption greedily until ``<PER>`` (or the budget, or the end token: then the result lead and
        ``<PER>`` are written for it), then run the decoder on ``<PER>``'s state."""
        with answering(self.device):
            return self._decode(encoded, instruction)

    def _decode(self, encoded: EncodedImage, instruction: Instruction) -> Decoded:
        model, proc, device = self.model, self.processor, self.device
        prompt, spans = proc.prompt(instruction)
        ids = torch.tensor([prompt], device=device)
        emb = model.embed(ids, encoded.image["image_tokens"])
        lm = model.language_model
        out = lm(inputs_embeds=emb, use_cache=True, output_hidden_states=True)
        prompt_states = model.text_states(out.hidden_states)
        cache = output_cache(out)
        banned = torch.tensor([proc.image_id, proc.user_id, proc.assistant_id, proc.pad_id], device=device)
        written: list[int] = []
        problems: list[str] = []
        logits = out.logits[0, -1]
        while True:
            if len(written) >= MAX_CAPTION_TOKENS:
                problems.append(f"no <PER> within {MAX_CAPTION_TOKENS} tokens: the result lead was written for it")
                forced = proc.result_ids
                break
            logits = logits.clone()
            logits[banned] = float("-inf")
            token = int(logits.argmax())
            if token == proc.eos_id:
                forced = proc.result_ids if written else proc.result_only_ids
                problems.append("the response ended before <PER>: the result lead was written for it")
                break
            if token == proc.per_id:
                forced = []
                break
            written.append(token)
            out = lm(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{CACHE_ARGUMENT: cache})
            cache, logits = output_cache(out), out.logits[0, -1]
        tail = [*forced, proc.per_id]
        out = lm(input_ids=torch.tensor([tail], device=device), use_cache=True, output_hidden_states=True,
                 **{CACHE_ARGUMENT: cache})  # fmt: skip
        per_state = out.hidden_states[-1][:, -1]
        span_t = torch.tensor([spans], device=device)
        valid = torch.ones((1, len(spans)), dtype=torch.bool, device=device)
        sentence = torch.tensor([instruction.kind == "sentence"], device=device)
        text = model.text_embeddings(prompt_states, span_t, valid)
        words = model.instruction_tokens(prompt_states, span_t, valid)
        preds = model.decode(per_state, text, valid, sentence, encoded.image["mask_features"], encoded.image["memory"],
                             words)  # fmt: skip
        response = decode_text(self.tokenizer, [*written, *tail])
        caption = decode_text(self.tokenizer, written).strip().rstrip(".").strip()
        return Decoded(response, caption, on_cpu(preds[-1]), problems)

    # -- answers ------------------------------------------------------------------------------------------------
    def ask_batch(
        self,
        images: list,
        questions: list[str],
        boxes: list | None = None,
        prompts: list[list[VisualPrompt] | None] | None = None,
    ) -> list[Answer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if boxes is not None and any(b is not None for b in boxes):
            raise ValueError("MVP-LM finds its own objects: it takes no boxes")
        if prompts is not None and any(prompts):
            raise ValueError("MVP-LM takes no visual prompts: name the objects in words or in a sentence")
        return self.answer(self.encode_batch(images), questions)

    def answer(self, encoded: list, questions: list[str]) -> list[Answer]:
        return [self._answer(e, q) for e, q in zip(encoded, questions, strict=True)]

    def checked_instruction(self, question: str) -> tuple[Instruction | None, list[str]]:
        """The question's instruction with duplicate names dropped, or None and the problems that stop it."""
        instruction = read_instruction(question)
        problems = list(instruction.problems)
        if instruction.kind == "word":
            names = list(dict.fromkeys(instruction.categories))
            if len(names) < len(instruction.categories):
                problems.append("duplicate names were asked once")
            if not names:
                return None, [*problems, "the word list is empty: name at least one category"]
            unknown = self.processor.unspellable(names)
            if unknown:
                return None, [*problems, f"the model's tokenizer cannot spell {unknown}: it cannot tell them apart"]
            instruction = word_instruction(names)
        elif not instruction.sentence:
            return None, [*problems, "the instruction is empty"]
        try:
            self.processor.prompt(instruction)
        except ValueError as e:
            return None, [*problems, str(e)]
        return instruction, problems

    @torch.no_grad()
    def _answer(self, encoded: EncodedImage, question: str) -> Answer:
        instruction, problems = self.checked_instruction(question)
        if instruction is None:
            return Answer("", [], problems=problems)
        decoded = self.decode(encoded, instruction)
        objects = self.objects(decoded.predictions, instruction, encoded.frame)
        return Answer(decoded.text, objects, problems=problems + decoded.problems, plain=decoded.caption)

    def objects(self, p: Predictions, instruction: Instruction, frame: ImageFrame,
                keep_all: bool = False) -> list[GroundedObject]:  # fmt: skip
        """The objects of one prediction set: thing queries only; ``keep_all`` keeps every query's best guess,
        whatever its score (for average precision), best first."""
        cfg = self.config
        things = cfg.thing_queries
        logits, background = p.class_logits[0, :things].float(), p.background[0, :things].float()
        mask_logits = p.masks[0, :things].float()
        mask_prob = mask_logits.sigmoid()
        on = mask_logits > 0
        mask_score = (mask_prob * on).flatten(1).sum(-1) / on.flatten(1).sum(-1).clamp(min=1)
        if instruction.kind == "sentence":
            prob = logits[:, 0].sigmoid()
            names = [instruction.sentence] * things
            threshold = cfg.referring_threshold
        else:
            c = len(instruction.categories)
            probs = torch.cat([logits[:, :c], background[:, None]], -1).softmax(-1)[:, :c]
            prob, label = probs.max(-1)
            names = [instruction.categories[int(k)] for k in label]
            prob = prob * mask_score
            threshold = cfg.object_threshold
        order = torch.argsort(prob, descending=True)
        keep = [int(q) for q in order if keep_all or float(prob[q]) > threshold]
        if not keep:
            return []
        masks = masks_to_image(mask_logits[keep], frame) > 0
        boxes = frame.to_pixels(xyxy_boxes(p.boxes[0, keep].float()).clamp(0, 1).numpy())
        out: list[GroundedObject] = []
        taken: list[tuple[int, int]] = []
        for j, q in enumerate(keep):
            m = masks[j]
            # a second query on the same object (mask IoU above 0.8, same name) repeats it
            if any(names[q] == names[k] and _mask_iou(m, masks[i]) > 0.8 for i, k in taken):
                continue
            taken.append((j, q))
            box = [float(v) for v in boxes[j]]
            out.append(GroundedObject(names[q], box, float(prob[q]), mask=mask_to_rle(m.numpy())))
        return out

    @torch.no_grad()
    def panoptic(self, image, names: list[str]) -> tuple[PanopticResult, Decoded]:
        """Mask2Former's panoptic merge of a word instruction's queries: those whose best name beats the background
        and scores above ``object_threshold`` compete per pixel (score times mask probability); a segment keeps the
        pixels it wins where its own mask is on, and is dropped if that is less than ``overlap_threshold`` of its
        mask. A stuff query's segments of one name merge into one."""
        encoded = self.encode_batch([image])[0]
        instruction = word_instruction(list(dict.fromkeys(names)))
        decoded = self.decode(encoded, instruction)
        return self.merge(decoded.predictions, instruction, encoded.frame), decoded

    def panoptic_picture_for(self, image, question: str):
        """The panoptic picture (``panoptic_picture``) of a word-list question, None for a sentence or a list that
        cannot be asked."""
        instruction, _ = self.checked_instruction(question)
        if instruction is None or instruction.kind != "word":
            return None
        array = load_image(image)
        result, _ = self.panoptic(array, list(instruction.categories))
        return panoptic_picture(array, result)

    def merge(self, p: Predictions, instruction: Instruction, frame: ImageFrame) -> PanopticResult:
        cfg = self.config
        c = len(instruction.categories)
        probs = torch.cat([p.class_logits[0, :, :c], p.background[0, :, None]], -1).float().softmax(-1)
        score, label = probs.max(-1)
        keep = ((label < c) & (score > cfg.object_threshold)).nonzero().flatten().tolist()
        ids = np.zeros((frame.height, frame.width), dtype=np.int32)
        if not keep:
            return PanopticResult(ids, [])
        masks = masks_to_image(p.masks[0, keep].float(), frame).sigmoid()
        weighted = score[keep][:, None, None] * masks
        winner = weighted.argmax(0)
        segments: list[dict] = []
        stuff_ids: dict[str, int] = {}
        for j, q in enumerate(keep):
            name = instruction.categories[int(label[q])]
            isthing = q < cfg.thing_queries
            own = masks[j] >= 0.5
            won = (winner == j) & own
            if int(own.sum()) == 0 or int(won.sum()) < cfg.overlap_threshold * int(own.sum()):
                continue
            if not isthing and name in stuff_ids:
                ids[won.numpy()] = stuff_ids[name]
                continue
            sid = len(segments) + 1
            ids[won.numpy()] = sid
            if not isthing:
                stuff_ids[name] = sid
            segments.append({"id": sid, "category": name, "isthing": isthing, "score": float(score[q])})
        return PanopticResult(ids, segments)


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def panoptic_picture(image: np.ndarray, result: PanopticResult, alpha: float = 0.55):
    """The image with each segment filled in its own colour and named at its centre (a PIL image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    colors = rng.integers(40, 255, size=(len(result.segments) + 1, 3))
    out = image.astype(np.float32).copy()
    for s in result.segments:
        m = result.ids == s["id"]
        out[m] = (1 - alpha) * out[m] + alpha * colors[s["id"]]
    picture = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for s in result.segments:
        ys, xs = np.nonzero(result.ids == s["id"])
        if len(xs):
            draw.text((float(xs.mean()), float(ys.mean())), s["category"], fill=(255, 255, 255))
    return picture
