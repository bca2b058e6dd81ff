"""``perceive.load(folder)`` for the released RexSeek-3B folder (and any folder in its layout).

The folder as released: ``config.json`` (``model_type`` "rexseek_qwen"), ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, Qwen's tokenizer files with the 104 added tokens (``<obj0>``..``<obj99>``,
``<ground>``, ``</ground>``, ``<objects>``, ``</objects>``) and, if present, ``generation_config.json`` (its end
tokens and repetition penalty are applied as ``transformers``' ``generate`` applies them). The folder's Python
files are never imported or run; the weights are read as safetensors only.

RexSeek has no proposal network: it answers by choosing among the boxes it is given (``boxes``, at most 100, a
detector's), greedily, as the release decodes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from perceive.answer import Answer, GroundedObject
from perceive.boxes import check_pixel_boxes
from perceive.formats import chatrex
from perceive.images import load_image
from perceive.models.folder_checks import (
    build_config,
    check_weights_fit,
    one_line,
    read_json_object,
    weight_files,
    weight_shapes,
)
from perceive.models.rexseek.configuration_rexseek import RexSeekConfig
from perceive.models.rexseek.modeling_rexseek import RexSeekForCausalLM, module_name, tower_shapes
from perceive.models.rexseek.processing_rexseek import MAX_BOXES, box_inputs, image_inputs, prompt_ids
from perceive.perceiver import ModelFolderError, Perceiver
from perceive.prompts import VisualPrompt

ADDED_TOKENS = [f"<obj{k}>" for k in range(MAX_BOXES)] + ["<ground>", "</ground>", "<objects>", "</objects>"]
# buffers some transformers versions save and others do not: never a difference between a folder and the model
_IGNORED = ("vision_tower.vision_tower.vision_model.embeddings.position_ids",)


def load_tokenizer(folder: Path, vocab_size: int):
    from transformers import Qwen2Tokenizer

    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(f"{folder}: no Qwen tokenizer could be read: {one_line(e)}") from None
    missing = [t for t in ADDED_TOKENS if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        raise ModelFolderError(f"{folder}: the tokenizer lacks RexSeek's tokens {', '.join(missing[:4])}"
                               f"{', ...' if len(missing) > 4 else ''}")  # fmt: skip
    if len(tokenizer) > vocab_size:
        raise ModelFolderError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
    return tokenizer


class RexSeekPerceiver(Perceiver):
    model_type = "rexseek_qwen"

    def __init__(self, model: RexSeekForCausalLM, tokenizer, end_ids: set[int], repetition_penalty: float) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.end_ids, self.repetition_penalty = end_ids, repetition_penalty

    @classmethod
    def model_types(cls) -> tuple[str, ...]:
        return ("rexseek_qwen",)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype | None = None) -> RexSeekPerceiver:
        """Load ``folder``; ``dtype`` (default: the weights') is what the model computes in."""
        from safetensors.torch import load_file

        config_path = folder / "config.json"
        config = build_config(RexSeekConfig, read_json_object(config_path), config_path)
        files = weight_files(folder)
        shapes = {k: v for f in files for k, v in weight_shapes(f).items() if k not in _IGNORED}
        try:
            clip, dims, depths = tower_shapes({k: tuple(v) for k, v in shapes.items()})
        except (KeyError, ValueError) as e:
            raise ModelFolderError(f"{files[0]}: not RexSeek's towers: {one_line(e)}") from None

        def build() -> RexSeekForCausalLM:
            model = RexSeekForCausalLM(config, clip, dims, depths)
            model.tie_weights()
            return model

        check_weights_fit(build, {module_name(k): v for k, v in shapes.items()}, config_path,
                          files[0] if len(files) == 1 else folder)  # fmt: skip
        tokenizer = load_tokenizer(folder, config.vocab_size)
        state = {module_name(k): v for f in files for k, v in load_file(str(f)).items() if k not in _IGNORED}
        dtype = dtype or state["model.embed_tokens.weight"].dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in the weights' precision: a 3B model in float32 takes 12 GB
        try:
            model = build()
        finally:
            torch.set_default_dtype(previous)
        if config.tie_word_embeddings:  # the release ties them; a stored lm_head is the same tensor
            state.pop("lm_head.weight", None)
        model.load_state_dict(state, strict=False)
        model.tie_weights()
        model.to(dtype)
        end_ids, penalty = {config.eos_token_id} if isinstance(config.eos_token_id, int) else set(), 1.0
        generation = folder / "generation_config.json"
        if generation.is_file():
            raw = read_json_object(generation)
            ends = raw.get("eos_token_id")
            end_ids |= {ends} if isinstance(ends, int) else {e for e in ends or [] if isinstance(e, int)}
            penalty = float(raw.get("repetition_penalty") or 1.0)
        end_ids |= {i for i in (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>"))
                    if isinstance(i, int) and i != tokenizer.unk_token_id}  # fmt: skip
        return cls(model, tokenizer, end_ids, penalty)

    def ask_batch(
        self,
        images: list,
        questions: list[str],
        boxes: list | None = None,
        prompts: list[list[VisualPrompt] | None] | None = None,
        max_new_tokens: int = 256,
    ) -> list[Answer]:
        """Answers; ``boxes[i]`` (xyxy pixels, 1 to 100) are the boxes image i's answer chooses among."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if prompts is not None and any(prompts):
            raise ValueError("RexSeek takes no visual prompts: give the region as a box and name it <obj0>")
        if boxes is None or len(boxes) != len(images) or any(b is None for b in boxes):
            raise ValueError("RexSeek answers by choosing among boxes you give (a detector's): pass boxes=[[x0, y0, "
                             "x1, y1], ...] for every image (perceive ask --boxes)")  # fmt: skip
        arrays = [load_image(im) for im in images]
        checked = [check_pixel_boxes(b) for b in boxes]
        for b in checked:
            if not 1 <= len(b) <= MAX_BOXES:
                raise ValueError(f"RexSeek takes 1 to {MAX_BOXES} boxes an image, got {len(b)}")
        size_aux, size_clip = self.model.aux_size, self.model.clip_size
        pixels = [image_inputs(a, size_aux, size_clip) for a in arrays]
        dtype = self.model.model.embed_tokens.weight.dtype
        frames = [box_inputs(b, a.shape[1], a.shape[0], size_aux).to(self.device)
                  for a, b in zip(arrays, checked, strict=True)]  # fmt: skip
        aux, clip = (torch.stack([p[k] for p in pixels]).to(self.device, dtype) for k in (0, 1))
        image_tokens, objects = self.model.encode(aux, clip, frames)
        answers = []
        for i, question in enumerate(questions):
            ids = prompt_ids(self.tokenizer, question, len(checked[i]))
            tokens = self.generate(self.model.embed(ids, image_tokens[i], objects[i]), max_new_tokens)
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            parsed = chatrex.parse(text, len(checked[i]))
            found = [GroundedObject(g.phrase, [float(v) for v in checked[i][k]], 1.0, index=k)
                     for g in parsed.groups for k in g.indices]  # fmt: skip
            given = [{"box": [float(v) for v in b], "score": 1.0} for b in checked[i]]
            answers.append(Answer(text, found, given, list(parsed.problems), parsed.text))
        return answers

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
        """Greedy tokens after the prompt ``embeds`` ``[L, hidden]``, up to an end token (not included)."""
        logits, cache = self.model(embeds[None])
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            scores = logits[0].float()
            if self.repetition_penalty != 1.0 and tokens:  # transformers' RepetitionPenaltyLogitsProcessor
                seen = torch.tensor(sorted(set(tokens)), device=scores.device)
                picked = scores[seen]
                scores[seen] = torch.where(
                    picked < 0, picked * self.repetition_penalty, picked / self.repetition_penalty
                )
            token = int(scores.argmax())
            if token in self.end_ids:
                break
            tokens.append(token)
            logits, cache = self.model(
                self.model.model.embed_tokens(torch.tensor([[token]], device=self.device)), cache
            )
        return tokens
