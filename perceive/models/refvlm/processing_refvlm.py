"""REF-VLM's processor: images and visual prompts to tensors, questions to prompt ids, TRP answers to ids with each
``<REF>`` 's units and phrase, and the decoders' targets.

A prompt is ``<image> x G^2 <|user|> {question} <|assistant|>``, each ``<region>`` of the question becoming the
``prompt_grid**2 + 1`` slots its prompt's tokens fill. Answers are written from fixed pieces (``TrpPieces``) so the
grammar that constrains generation and the ids the model learns from are the same tokens with any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from perceive.boxes import convert
from perceive.data.tasks_refvlm import REGION, Group, RefVlmItem, rasterize_prompt
from perceive.formats.refvlm import PHRASE_CLOSE, PHRASE_OPEN, REF, TASK_CLOSE, TASK_OPEN, UNIT_CLOSE, UNIT_OPEN
from perceive.models.image_processing import ImageFrame, dual_resolution_pixels
from perceive.models.mvp.processing_mvp import target_masks
from perceive.models.refvlm.configuration_refvlm import RefVlmConfig
from perceive.models.refvlm.modeling_refvlm import UNITS
from perceive.prompts import VisualPrompt
from perceive.tokenization import ASSISTANT, IMAGE, USER

IGNORE = -100
MAX_COUNT = 100  # the most targets one phrase may have (a number the tokenizer spells in one token)
REFVLM_TOKENS = (TASK_OPEN, TASK_CLOSE, UNIT_OPEN, UNIT_CLOSE, PHRASE_OPEN, PHRASE_CLOSE, REF, REGION)
# the model's choices, each one token (``TrpPieces``); a real tokenizer that splits one (Qwen's digits) gets it added
ONE_TOKEN_CHOICES = ("True", "False", "(", ")", ",", *UNITS, *(str(k) for k in range(MAX_COUNT + 1)))


class TrpPieces:
    """The token ids of every fixed piece of a TRP answer, for one tokenizer. The model's choices (true or false,
    a unit, a count) must each be one token; a tokenizer that splits them is refused here, by name."""

    def __init__(self, tokenizer) -> None:
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        def fixed(text: str) -> list[int]:
            found = ids(text)
            if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in found:
                raise ValueError(f"the tokenizer cannot spell {text!r} (an unknown token); TRP's answers need it")
            return found

        def one(text: str) -> int:
            found = fixed(text)
            if len(found) != 1:
                raise ValueError(f"the tokenizer spells {text!r} in {len(found)} tokens; TRP's grammar needs one")
            return found[0]

        special = tokenizer.convert_tokens_to_ids
        self.task_open, self.task_close = special(TASK_OPEN), special(TASK_CLOSE)
        self.unit_open, self.unit_close = special(UNIT_OPEN), special(UNIT_CLOSE)
        self.phrase_open, self.phrase_close = special(PHRASE_OPEN), special(PHRASE_CLOSE)
        self.ref, self.eos = special(REF), tokenizer.eos_token_id
        self.decode_lead = fixed("Unit decode (")
        self.true, self.false = one("True"), one("False")
        self.true_tail = fixed("). Class name, target unit and number:")
        self.false_tail = fixed(").")
        self.entry = fixed("- Name:")
        self.unit_lead = fixed("Unit:")
        self.num_lead = fixed("Num:")
        self.group_open, self.group_close, self.comma = one("("), one(")"), one(",")
        self.units = {u: one(u) for u in UNITS}
        self.unit_of = {t: u for u, t in self.units.items()}
        self.numbers = [one(str(k)) for k in range(MAX_COUNT + 1)]
        self.ids = ids

    def label(self, k: int) -> list[int]:
        return self.ids(f"[{k}]")

    def unit_list(self, units: Sequence[str]) -> list[int]:
        out: list[int] = []
        for i, u in enumerate(units):
            out += ([self.comma] if i else []) + [self.units[u]]
        return [self.unit_open, *out, self.unit_close]

    def plan(self, entries: Sequence[tuple[list[int], Sequence[str], int]]) -> list[int]:
        """``<Task>`` ... ``</Task>`` for (name ids, units, count) entries; none: ``Unit decode (False)``."""
        if not entries:
            return [self.task_open, *self.decode_lead, self.false, *self.false_tail, self.task_close]
        out = [self.task_open, *self.decode_lead, self.true, *self.true_tail]
        for name, units, count in entries:
            out += [*self.entry, *name, *self.unit_lead, *self.unit_list(units), *self.num_lead, self.numbers[count]]
        return [*out, self.task_close]

    def triplet(self, name: list[int], units: Sequence[str], count: int) -> list[int]:
        refs = [t for k in range(count) for t in (*self.label(k), self.ref)]
        return [self.phrase_open, *name, self.phrase_close, self.group_open, *self.unit_list(units), *refs,
                self.group_close]  # fmt: skip


@dataclass
class EncodedAnswer:
    ids: list[int]
    ref_units: list[tuple[str, ...]]  # per <REF>, in order
    ref_groups: list[int]  # per <REF>: its phrase's index


class RefVlmProcessor:
    def __init__(self, tokenizer, config: RefVlmConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        ids = tokenizer.convert_tokens_to_ids
        self.image_id, self.region_id = ids(IMAGE), ids(REGION)
        self.user_id, self.assistant_id, self.eos_id = ids(USER), ids(ASSISTANT), tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.pieces = TrpPieces(tokenizer)

    def images(self, images: Sequence[np.ndarray]) -> tuple[dict[str, torch.Tensor], list[ImageFrame]]:
        pixels, frames = dual_resolution_pixels(images, self.config.low_resolution, self.config.high_resolution)
        pixels.pop("rgb_high")
        return pixels, frames

    def prompt_masks(self, prompts: Sequence[VisualPrompt], frame: ImageFrame) -> torch.Tensor:
        """``[P, R, R]`` float: each prompt rasterised at the image's size, placed in the square frame, resized to
        the global features' grid and binarised (the released code's ``> 0``)."""
        r = self.config.prompt_resolution
        if not prompts:
            return torch.zeros((0, r, r))
        for p in prompts:
            p.check(frame.width, frame.height)
        masks = [rasterize_prompt(p, frame.height, frame.width) for p in prompts]
        pooled = target_masks(masks, frame, r)
        empty = [i for i, m in enumerate(pooled) if float(m.sum()) == 0]
        if empty:
            raise ValueError(f"visual prompt {empty[0] + 1} covers no pixel of the image")
        return (pooled > 0).float()

    def prompt(self, question: str, n_prompts: int) -> list[int]:
        """The prompt's ids; each ``<region>`` of ``question`` becomes its prompt's slots."""
        pieces = question.split(REGION)
        if len(pieces) - 1 != n_prompts:
            raise ValueError(f"the question has {len(pieces) - 1} {REGION} placeholders for {n_prompts} visual "
                             f"prompts: put one {REGION} where each prompt belongs")  # fmt: skip
        ids = [self.image_id] * (self.config.image_grid**2) + [self.user_id]
        for i, piece in enumerate(pieces):
            if i:
                ids += [self.region_id] * self.config.region_tokens
            ids += self.pieces.ids(piece)
        max_len = int(self.config.text().max_position_embeddings)
        if len(ids) + 1 > max_len:
            raise ValueError(f"the question is {len(ids) + 1} tokens with the image's; the model reads at most "
                             f"{max_len}")  # fmt: skip
        return [*ids, self.assistant_id]

    def answer(self, item: RefVlmItem) -> EncodedAnswer:
        """The answer's ids (ending in the end token) with each ``<REF>`` 's units and phrase."""
        p = self.pieces
        units: list[tuple[str, ...]] = []
        groups: list[int] = []

        def note(g: int, group: Group) -> None:
            units.extend([group.units] * len(group.targets))
            groups.extend([g] * len(group.targets))

        if item.kind == "plan":
            names = [p.ids(g.name) for g in item.groups]
            ids = p.plan([(n, g.units, len(g.targets)) for n, g in zip(names, item.groups, strict=True)])
            for g, (name, group) in enumerate(zip(names, item.groups, strict=True)):
                ids += p.triplet(name, group.units, len(group.targets))
                note(g, group)
        elif item.kind == "text":
            ids = p.plan([]) + p.ids(item.text)
        elif item.kind == "caption":
            ids, pos = [], 0
            for g, group in enumerate(item.groups):
                assert group.span is not None
                ids += p.ids(item.text[pos : group.span[0]]) + p.triplet(p.ids(group.name), group.units,
                                                                         len(group.targets))  # fmt: skip
                pos = group.span[1]
                note(g, group)
            ids += p.ids(item.text[pos:])
        else:
            raise ValueError(f"unknown answer kind {item.kind!r}")
        return EncodedAnswer([*ids, self.eos_id], units, groups)

    def collate(self, prompts: list[list[int]], answers: list[EncodedAnswer]) -> dict:
        """Right-padded ids, attention mask, labels (the answers' tokens) and each ``<REF>`` 's units."""
        seqs = [pr + a.ids for pr, a in zip(prompts, answers, strict=True)]
        length = max(len(s) for s in seqs)
        b = len(seqs)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        for i, (pr, s) in enumerate(zip(prompts, seqs, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, len(pr) : len(s)] = torch.tensor(s[len(pr) :])
            attention[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": attention, "labels": labels,
                "ref_units": [units_tensor(a.ref_units) for a in answers]}  # fmt: skip

    @property
    def mask_size(self) -> int:
        """The side of the decoders' dense outputs: stride 4 of the high-resolution frame."""
        return self.config.high_resolution // 4

    def targets(self, item: RefVlmItem, answer: EncodedAnswer, frame: ImageFrame) -> dict[str, torch.Tensor]:
        """The decoders' targets of one sample, in the answer's group order."""
        flat = [(g, t) for g, group in enumerate(item.groups) for t in group.targets]
        boxes = torch.tensor(frame.normalize(np.array([t.box for _, t in flat]).reshape(-1, 4)))
        empty = np.zeros((frame.height, frame.width), dtype=bool)
        k = self.config.num_keypoints
        keypoints = torch.zeros((len(flat), k, 3))
        for i, (_, t) in enumerate(flat):
            if t.keypoints:
                kp = torch.tensor(t.keypoints, dtype=torch.float32)[:k]
                keypoints[i, : len(kp), :2] = kp[:, :2] / frame.side
                keypoints[i, : len(kp), 2] = kp[:, 2]
        return {"boxes": convert(boxes.clamp(0, 1), "xyxy", "cxcywh"),
                "masks": target_masks([t.mask if t.mask is not None else empty for _, t in flat], frame,
                                      self.mask_size),
                "has_mask": torch.tensor([t.mask is not None for _, t in flat], dtype=torch.bool),
                "keypoints": keypoints,
                "groups": torch.tensor([g for g, _ in flat], dtype=torch.long),
                "ref_groups": torch.tensor(answer.ref_groups, dtype=torch.long)}  # fmt: skip


def units_tensor(ref_units: Sequence[Sequence[str]]) -> torch.Tensor:
    """``[R, 3]`` bool: which decoders (box, mask, keypoint) each ``<REF>`` goes to."""
    out = torch.zeros((len(ref_units), len(UNITS)), dtype=torch.bool)
    for r, units in enumerate(ref_units):
        for u in units:
            out[r, UNITS.index(u)] = True
    return out
