"""REF-VLM in use: ``RefVlmPerceiver.ask(image, question, prompts=[...])``.

The question is any text; Table II's templates are what the model was taught (``perceive.data.tasks_refvlm``), e.g.
"Provide a segmentation mask for the red circle in the picture." or, with a visual prompt, "Please generate a mask
based on the region <region> in the image.". Each ``<region>`` takes one visual prompt (point, box, scribble or
mask; ``perceive.prompts``), in order.

The model writes its answer under the TRP grammar (``grammar_refvlm``), keeping each ``<REF>`` 's last-layer state
as it goes; the decoders then run once on them. Objects carry their phrase, a box, a score, a mask (COCO RLE, for
``mask`` units) and keypoints (``keypoint`` units), in the input image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from perceive.answer import Answer, GroundedObject
from perceive.boxes import mask_to_rle
from perceive.data.tasks_refvlm import RefVlmItem
from perceive.devices import answering, on_cpu
from perceive.formats import refvlm as trp
from perceive.models.folder_checks import (
    build_config,
    check_token_ids,
    check_weights_fit,
    read_json_object,
    weight_shapes,
)
from perceive.models.generation import CACHE_ARGUMENT, generate, output_cache
from perceive.models.image_processing import EncodedImage, ImageFrame, encode_images
from perceive.models.mvp.processing_mvp import masks_to_image
from perceive.models.refvlm.configuration_refvlm import RefVlmConfig
from perceive.models.refvlm.grammar_refvlm import Part, TrpGrammar, TrpState
from perceive.models.refvlm.modeling_refvlm import UNITS, RefVlmForConditionalGeneration, Routed
from perceive.models.refvlm.processing_refvlm import RefVlmProcessor, units_tensor
from perceive.perceiver import Perceiver
from perceive.prompts import VisualPrompt
from perceive.tokenization import IMAGE, decode_text, load_tokenizer

MAX_NEW_TOKENS = 320


@dataclass
class Decoded:
    """One answer: its canonical TRP text, the parsed answer, each ``<REF>`` 's units and phrase, the decoders'
    outputs and the problems met."""

    text: str
    parsed: trp.RefVlmAnswer
    ref_units: list[tuple[str, ...]]
    ref_phrases: list[str]
    routed: dict[str, Routed]
    problems: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # the generated answer's ids (empty when teacher-forced)


class RefVlmDecoding:
    """One prompt's forward pass with a KV cache, then a token per ``step``, keeping each fed token's last-layer
    state (a ``<REF>`` 's state is the one its decoder reads) and its state averaged over the layers (what the
    decoders read of the text)."""

    @torch.no_grad()
    def __init__(self, model: RefVlmForConditionalGeneration, embeds: torch.Tensor) -> None:
        self.lm = model.language_model
        out = self.lm.model(inputs_embeds=embeds, use_cache=True, output_hidden_states=True)
        self.cache = output_cache(out)
        self.logits = self.lm.lm_head(out.last_hidden_state[:, -1])
        self.prompt_means = torch.stack(out.hidden_states).mean(0)[0]
        self.states: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.lm.model(input_ids=tokens[:, None], use_cache=True, output_hidden_states=True,
                            **{CACHE_ARGUMENT: self.cache})  # fmt: skip
        self.cache = output_cache(out)
        self.states.append(out.last_hidden_state[0, -1])
        self.means.append(torch.stack(out.hidden_states).mean(0)[0, -1])
        self.logits = self.lm.lm_head(out.last_hidden_state[:, -1])
        return self.logits


class RefVlmPerceiver(Perceiver):
    model_type = "refvlm"
    takes_prompts = True

    def __init__(self, model: RefVlmForConditionalGeneration, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = cast(RefVlmConfig, model.config)
        self.processor = RefVlmProcessor(tokenizer, self.config)
        self.grammar = TrpGrammar(tokenizer, self.config.text().vocab_size)
        self.max_new_tokens = max_new_tokens

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return (RefVlmConfig.model_type,)

    @classmethod
    def from_folder(cls, folder: Path) -> RefVlmPerceiver:
        """The model in ``folder``, checked before it is built: the configuration's fields, the weights complete and
        shaped as it describes, a tokenizer whose ``<image>``, ``<region>`` and ``<REF>`` ids are the
        configuration's."""
        for need in ("config.json", "model.safetensors"):
            if not (folder / need).is_file():
                raise FileNotFoundError(f"{folder} is not a REF-VLM model folder: {need} is missing")
        config_path, weights = folder / "config.json", folder / "model.safetensors"
        config = build_config(RefVlmConfig, read_json_object(config_path), config_path)
        check_weights_fit(lambda: RefVlmForConditionalGeneration(config), weight_shapes(weights), config_path, weights)
        tokenizer = load_tokenizer(folder)
        placeholders = [("image_token_id", config.image_token_id, IMAGE),
                        ("region_token_id", config.region_token_id, "<region>"),
                        ("ref_token_id", config.ref_token_id, trp.REF)]  # fmt: skip
        check_token_ids(tokenizer, config.text().vocab_size, placeholders, config_path, folder)
        model = RefVlmForConditionalGeneration.from_pretrained(str(folder), use_safetensors=True)
        return cls(model, tokenizer)

    # -- encoding ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_batch(self, images: list, boxes: list | None = None) -> list[EncodedImage]:
        return encode_images(images, self.processor, self.model)

    # -- answers ---------------------------------------------------------------------------------------------------
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
            raise ValueError("REF-VLM finds its own objects: it takes no boxes (point at a region with a visual "
                             "prompt and <region> instead)")  # fmt: skip
        return self.answer(self.encode_batch(images), questions, prompts)

    def answer(self, encoded: list, questions: list[str],
               prompts: list[list[VisualPrompt] | None] | None = None) -> list[Answer]:  # fmt: skip
        given = prompts if prompts is not None else [None] * len(encoded)
        return [self._answer(e, q, list(p or [])) for e, q, p in zip(encoded, questions, given, strict=True)]

    @torch.no_grad()
    def _answer(self, encoded: EncodedImage, question: str, prompts: list[VisualPrompt]) -> Answer:
        decoded = self.generate(encoded, question, prompts)
        objects = self.objects(decoded, encoded.frame)
        return Answer(decoded.text, objects, problems=decoded.problems, plain=decoded.parsed.text)

    @torch.no_grad()
    def generate(self, encoded: EncodedImage, question: str, prompts: list[VisualPrompt],
                 constrained: bool = True) -> Decoded:  # fmt: skip
        """The answer under the TRP grammar and its decoders' outputs. ``constrained=False`` decodes greedily
        without the grammar (to measure what it adds); its malformed answers are reported, not raised."""
        with answering(self.device):
            return self._generate(encoded, question, prompts, constrained)

    def _generate(
        self, encoded: EncodedImage, question: str, prompts: list[VisualPrompt], constrained: bool
    ) -> Decoded:
        masks = self.processor.prompt_masks(prompts, encoded.frame).to(self.device)
        prompt_ids = self.processor.prompt(question, len(prompts))
        embeds = self.model.embed(torch.tensor([prompt_ids], device=self.device), encoded.image, [masks])
        session = RefVlmDecoding(self.model, embeds)
        budget = min(self.max_new_tokens, int(self.config.text().max_position_embeddings) - len(prompt_ids))
        gen = generate(session, self.grammar, [{}], budget, constrained=constrained)[0]
        tokens = gen.token_ids
        ref_pos = [i for i, t in enumerate(tokens) if t == self.processor.pieces.ref]
        states = torch.stack([session.states[i] for i in ref_pos]) if ref_pos else None
        text = self.render(self.state_after(tokens)) if constrained else decode_text(self.tokenizer, tokens)
        # every fed token's layer-averaged state: the prompt's and each generated token's (the end token is never fed)
        means = torch.cat([session.prompt_means, *[m[None] for m in session.means[: len(tokens)]]])[None]
        ids = torch.tensor([prompt_ids + tokens], device=self.device)
        words = self.model.text_memory(means, self.model.text_positions(ids))
        decoded = self.decode_refs(text, states, encoded, words, masks)
        decoded.tokens = list(tokens)
        return decoded

    @torch.no_grad()
    def teacher_forced(self, encoded: EncodedImage, item: RefVlmItem) -> Decoded:
        """The decoders' outputs when the model reads ``item``'s true answer instead of writing its own (what the
        decoders achieve given the right words)."""
        masks = self.processor.prompt_masks(item.prompts, encoded.frame).to(self.device)
        prompt_ids = self.processor.prompt(item.question, len(item.prompts))
        answer = self.processor.answer(item)
        ids = torch.tensor([prompt_ids + answer.ids], device=self.device)
        out = self.model.language_model(inputs_embeds=self.model.embed(ids, encoded.image, [masks]),
                                        output_hidden_states=True)  # fmt: skip
        states = out.hidden_states[-1][0, ids[0] == self.processor.pieces.ref]
        text = self.model.text_memory(torch.stack(out.hidden_states).mean(0), self.model.text_positions(ids))
        return self.decode_refs(self.render(self.state_after(answer.ids[:-1])), states, encoded, text, masks)

    def state_after(self, tokens: list[int]) -> TrpState:
        """The grammar's state after ``tokens`` (which it must allow)."""
        state = self.grammar.start()
        for t in tokens:
            state = self.grammar.advance(state, t)
        return state

    def decode_refs(self, text: str, states: torch.Tensor | None, encoded: EncodedImage,
                    words: tuple[torch.Tensor, torch.Tensor] | None = None,
                    prompt_masks: torch.Tensor | None = None) -> Decoded:  # fmt: skip
        """Parse ``text`` and run the decoders on the ``<REF>`` states (``[R, H]``, in order), reading ``words``
        (the model's ``text_memory``) and the question's visual prompts (``[P, R, R]``) too."""
        parsed = trp.parse(text)
        problems = list(parsed.problems)
        units: list[tuple[str, ...]] = [()] * parsed.num_refs
        phrases = [""] * parsed.num_refs
        for t in parsed.triplets:
            for g in t.groups:
                known = tuple(u for u in g.units if u in UNITS)
                for o in g.ref_ordinals:
                    units[o], phrases[o] = known, t.phrase
        n = 0 if states is None else len(states)
        if n != parsed.num_refs:
            problems.append(f"the answer has {parsed.num_refs} <REF> in its text but {n} states")
            units, phrases = units[:n], phrases[:n]
        empty = torch.zeros((0, self.config.text().hidden_size), device=self.device)
        ref_states = [states if states is not None else empty]
        refs = ref_states[:1] if n else [ref_states[0][:0]]
        selection = self.model.select(refs, encoded.image, None if prompt_masks is None else [prompt_masks])
        routed = self.model.decode(refs, [units_tensor(units).to(self.device)], encoded.image, words, selection)
        return Decoded(text, parsed, units, phrases, on_cpu(routed), problems)

    def render(self, state: TrpState) -> str:
        """The canonical TRP text of a finished grammar state (``perceive.formats.refvlm.render``)."""
        words = lambda ids: decode_text(self.tokenizer, ids)  # noqa: E731
        task = None
        if state.decode is not None:
            entries = tuple(trp.PlanEntry(words(e.ids), e.units, e.count) for e in state.entries)
            task = trp.TaskPlan(state.decode, entries if state.decode else ())
        text, triplets = "", []
        parts: tuple[Part, ...] = state.parts
        for part in parts:
            piece = words(part.ids)
            sep = " " if text and piece else ""
            if part.kind == "text":
                text += sep + piece
                continue
            start = len(text) + len(sep)
            text += sep + piece
            group = trp.UnitGroup(part.units, tuple(range(part.count)), ())
            triplets.append(trp.Triplet(piece, (start, len(text)), (group,)))
        return trp.render(text, triplets, task)

    # -- objects -----------------------------------------------------------------------------------------------------
    def objects(self, decoded: Decoded, frame: ImageFrame, box_readout: str | None = None) -> list[GroundedObject]:
        """One object per ``<REF>`` (a box, a mask, keypoints as its units say), in the answer's order; box units
        read as ``box_readout`` says (default: the configuration's)."""
        out = []
        slot = {u: {r: s for s, r in enumerate(decoded.routed[u].index[0])} for u in UNITS}
        for r, (units, phrase) in enumerate(zip(decoded.ref_units, decoded.ref_phrases, strict=True)):
            if not units:
                continue
            box, score, mask, keypoints = None, 1.0, None, None
            if "mask" in units:
                p = decoded.routed["mask"].layers[-1]
                assert p.masks is not None
                logits = masks_to_image(p.masks[0, slot["mask"][r]][None].float(), frame)[0]
                on = logits > 0
                prob = logits.sigmoid()
                score = float(prob[on].mean()) if bool(on.any()) else float(prob.max())
                mask = on.numpy()
                box = _extent(mask)
            if "box" in units:
                box, score = self.box(decoded.routed["box"], slot["box"][r], frame, box_readout)
            if "keypoint" in units:
                keypoints = self.keypoints(decoded.routed["keypoint"], slot["keypoint"][r], frame)
                if box is None:
                    seen = [k for k in keypoints if k[2] > 0] or keypoints
                    xs, ys = [k[0] for k in seen], [k[1] for k in seen]
                    box = [min(xs), min(ys), max(xs), max(ys)]
            if box is None:
                box = [0.0, 0.0, 0.0, 0.0]
            rle = None if mask is None else mask_to_rle(mask)
            out.append(GroundedObject(phrase, [float(v) for v in box], score, mask=rle, keypoints=keypoints))
        return out

    def box(self, routed: Routed, q: int, frame: ImageFrame, readout: str | None = None) -> tuple[list[float], float]:
        """A box ``<REF>`` 's box in pixels and its score: the painted area's extent (``"dense"``) or the regressed
        box (``"regression"``; also where nothing is painted); the score is the area's mean probability inside."""
        p = routed.layers[-1]
        assert p.boxes is not None and p.areas is not None
        prob = p.areas[0, q].float().sigmoid()
        side = prob.shape[-1]
        regressed = frame.to_pixels(_xyxy(p.boxes[0, q].float()).clamp(0, 1).numpy())[0]
        on = prob > 0.5
        if (readout or self.config.box_readout) == "regression" or not bool(on.any()):
            b = torch.tensor(frame.normalize(regressed)[0]) * side
            x0, y0, x1, y1 = (int(v) for v in b.clamp(0, side - 1).tolist())
            inside = prob[y0 : y1 + 1, x0 : x1 + 1]
            return [float(v) for v in regressed], float(inside.mean()) if inside.numel() else 0.0
        ys, xs = on.nonzero(as_tuple=True)
        cells = np.array([[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]) / side
        return [float(v) for v in frame.to_pixels(cells)[0]], float(prob[on].mean())

    def keypoints(self, routed: Routed, q: int, frame: ImageFrame) -> list[list[float]]:
        """17 ``[x, y, v]`` in pixels: each heatmap's peak cell centre; v 2 where the visibility logit is positive,
        else 0 (the point kept)."""
        p = routed.layers[-1]
        assert p.heatmaps is not None and p.visible is not None
        heat = p.heatmaps[0, q].float()
        h, w = heat.shape[-2:]
        flat = heat.flatten(1).argmax(-1)
        xs = ((flat % w).float() + 0.5) / w * frame.side
        ys = ((flat // w).float() + 0.5) / h * frame.side
        vis = p.visible[0, q].float() > 0
        return [[float(min(x, frame.width)), float(min(y, frame.height)), 2 if bool(v) else 0]
                for x, y, v in zip(xs, ys, vis, strict=True)]  # fmt: skip


def _xyxy(box: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _extent(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
