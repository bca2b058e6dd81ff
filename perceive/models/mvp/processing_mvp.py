"""MVP-LM's processor: images to tensors, instructions to prompt ids with each category's (or the sentence's) token
span, responses to labels, and the decoder's outputs back to objects in the input image's pixels.

A prompt is ``<image> x G^2 <|user|> {task description} {instruction} <|assistant|>``; the response is ``{caption}.
The perception result is <PER>`` and the end token. The instruction is tokenized piece by piece (each category
name, each separator) so every name's span is exact with any tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from perceive.formats.mvp import PER, RESULT_LEAD, SENTENCE_TASK, WORD_TASK, Instruction
from perceive.models.image_processing import ImageFrame, dual_resolution_pixels
from perceive.models.mvp.configuration_mvp import MvpConfig
from perceive.tokenization import ASSISTANT, IMAGE, USER

IGNORE = -100


@dataclass
class Encoded:
    """One sample's ids: the prompt (and response), where ``<PER>`` is, and the instruction's spans."""

    ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]]
    per_index: int


class MvpProcessor:
    def __init__(self, tokenizer, config: MvpConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        ids = tokenizer.convert_tokens_to_ids
        self.image_id, self.per_id = ids(IMAGE), ids(PER)
        self.user_id, self.assistant_id, self.eos_id = ids(USER), ids(ASSISTANT), tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.unk_id = tokenizer.unk_token_id
        self.lead_ids = {"word": self.text_ids(WORD_TASK), "sentence": self.text_ids(SENTENCE_TASK)}
        self.separator_ids = self.text_ids(",")
        self.result_ids = self.text_ids(f". {RESULT_LEAD}")
        self.result_only_ids = self.text_ids(RESULT_LEAD)

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def images(self, images: Sequence[np.ndarray]) -> tuple[dict[str, torch.Tensor], list[ImageFrame]]:
        pixels, frames = dual_resolution_pixels(images, self.config.low_resolution, self.config.high_resolution)
        pixels.pop("rgb_high")
        return pixels, frames

    def unspellable(self, words: Sequence[str]) -> list[str]:
        """The names that the tokenizer spells with an unknown token somewhere (a word-level tokenizer that never
        saw the word): the model cannot tell them apart."""
        if self.unk_id is None:
            return []
        return [w for w in words if self.unk_id in self.text_ids(w)]

    def prompt(self, instruction: Instruction) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's ids and the spans of the categories (word) or of the sentence, as positions in them."""
        ids = [self.image_id] * (self.config.image_grid**2) + [self.user_id] + self.lead_ids[instruction.kind]
        spans = []
        pieces = instruction.categories if instruction.kind == "word" else (instruction.sentence,)
        for i, piece in enumerate(pieces):
            if i:
                ids += self.separator_ids
            piece_ids = self.text_ids(piece)
            if not piece_ids:
                raise ValueError(f"{piece!r} has no tokens")
            spans.append((len(ids), len(ids) + len(piece_ids)))
            ids += piece_ids
        max_len = int(self.config.text().max_position_embeddings)
        if len(ids) + 1 > max_len:
            raise ValueError(f"the instruction is {len(ids) + 1} tokens with the image's; the model reads at most "
                             f"{max_len}")  # fmt: skip
        return [*ids, self.assistant_id], spans

    def response_ids(self, caption: str) -> list[int]:
        """``{caption}. The perception result is <PER>`` (no caption: the lead alone) and the end token."""
        caption = caption.strip().rstrip(".")
        lead = self.text_ids(caption) + self.result_ids if caption else self.result_only_ids
        return [*lead, self.per_id, self.eos_id]

    def example(self, instruction: Instruction, caption: str) -> Encoded:
        prompt, spans = self.prompt(instruction)
        response = self.response_ids(caption)
        ids = prompt + response
        labels = [IGNORE] * len(prompt) + response
        return Encoded(ids, labels, spans, len(prompt) + response.index(self.per_id))

    def collate(self, examples: Sequence[Encoded], instructions: Sequence[Instruction]) -> dict[str, torch.Tensor]:
        """Right-padded ids, attention mask, labels, ``<PER>`` positions and the instruction spans."""
        length = max(len(e.ids) for e in examples)
        width = max(len(e.spans) for e in examples)
        b = len(examples)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        spans = torch.zeros((b, width, 2), dtype=torch.long)
        valid = torch.zeros((b, width), dtype=torch.bool)
        for i, e in enumerate(examples):
            ids[i, : len(e.ids)] = torch.tensor(e.ids)
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
            attention[i, : len(e.ids)] = 1
            spans[i, : len(e.spans)] = torch.tensor(e.spans)
            valid[i, : len(e.spans)] = True
        return {"input_ids": ids, "attention_mask": attention, "labels": labels,
                "per_index": torch.tensor([e.per_index for e in examples]), "spans": spans, "span_valid": valid,
                "sentence": torch.tensor([ins.kind == "sentence" for ins in instructions])}  # fmt: skip

    @property
    def mask_size(self) -> int:
        """The side of the decoder's masks: stride 4 of the high-resolution frame."""
        return self.config.high_resolution // 4


def masks_to_image(logits: torch.Tensor, frame: ImageFrame) -> torch.Tensor:
    """``[Q, h, w]`` mask logits over the square frame to ``[Q, H, W]`` logits at the input image's size: each output
    pixel samples the frame where it lies (the image fills the frame's top-left ``W x H`` of ``side x side``)."""
    side = frame.side
    xs = (torch.arange(frame.width, dtype=torch.float32) + 0.5) / side * 2 - 1
    ys = (torch.arange(frame.height, dtype=torch.float32) + 0.5) / side * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)[None]  # [1, H, W, 2] as (x, y)
    out = F.grid_sample(logits[:, None].float(), grid.expand(len(logits), -1, -1, -1), mode="bilinear",
                        align_corners=False)  # fmt: skip
    return out[:, 0]


def target_masks(masks: Sequence[np.ndarray], frame: ImageFrame, size: int) -> torch.Tensor:
    """``[T, size, size]`` float targets: each ``[H, W]`` bool mask placed in its square frame and area-resized."""
    if not masks:
        return torch.zeros((0, size, size))
    side = frame.side
    m = torch.zeros((len(masks), 1, side, side))
    for i, mask in enumerate(masks):
        m[i, 0, : mask.shape[0], : mask.shape[1]] = torch.from_numpy(np.asarray(mask, dtype=np.float32))
    return (F.adaptive_avg_pool2d(m, size) if side >= size else F.interpolate(m, size=(size, size)))[:, 0]
