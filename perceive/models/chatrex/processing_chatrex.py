"""The retrieval model's processor: images to tensors, question and boxes to prompt ids, answers to
training labels.

Images go through ``perceive.models.image_processing`` (padded to a square, so boxes keep their shape);
boxes travel as xyxy normalised by the padded square's side, and ``ImageFrame.to_pixels`` maps them back.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import numpy as np
import torch

from perceive.formats.chatrex import NONE_ANSWER
from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
from perceive.models.image_processing import ImageFrame, dual_resolution_pixels
from perceive.tokenization import ASSISTANT, IMAGE, OBJ_TOKENS, OBJECTS_CLOSE, OBJECTS_OPEN, ROI, USER

IGNORE = -100


class ChatRexProcessor:
    def __init__(self, tokenizer, config: ChatRexConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        ids = tokenizer.convert_tokens_to_ids
        self.image_id, self.roi_id = ids(IMAGE), ids(ROI)
        self.user_id, self.assistant_id, self.eos_id = ids(USER), ids(ASSISTANT), tokenizer.eos_token_id
        self.obj_ids = [ids(t) for t in OBJ_TOKENS]
        self.obj_index = {t: k for k, t in enumerate(self.obj_ids)}
        self.objects_open, self.objects_close = ids(OBJECTS_OPEN), ids(OBJECTS_CLOSE)
        none = self._text_ids(NONE_ANSWER)
        self.none_id = none[0] if len(none) == 1 else None  # as the decoding grammar's "None"
        self.pad_id = tokenizer.pad_token_id

    # ------------------------------------------------------------------------------------------
    # images
    # ------------------------------------------------------------------------------------------

    def images(self, images: Sequence[np.ndarray]) -> tuple[dict[str, torch.Tensor], list[ImageFrame]]:
        """``[H, W, 3]`` uint8 RGB arrays to ``pixel_low``, ``pixel_high`` (normalised) and ``rgb_high``."""
        return dual_resolution_pixels(images, self.config.low_resolution, self.config.high_resolution)

    # ------------------------------------------------------------------------------------------
    # prompts and labels
    # ------------------------------------------------------------------------------------------

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, question: str, num_boxes: int) -> list[int]:
        if num_boxes > self.config.max_objects:
            raise ValueError(f"at most {self.config.max_objects} boxes, got {num_boxes}")
        named = sorted({int(k) for k in re.findall(r"<obj(\d+)>", question)})
        if named and named[-1] >= num_boxes:
            raise ValueError(f"the question names <obj{named[-1]}>, but there are {num_boxes} boxes "
                             f"(<obj0> to <obj{num_boxes - 1}>)")  # fmt: skip
        image = [self.image_id] * (self.config.image_grid**2)
        if self.config.box_tokens == "fused":  # the model adds <objK>'s embedding to the k-th <roi>
            boxes = [self.roi_id] * num_boxes
        else:
            boxes = [t for k in range(num_boxes) for t in (self.obj_ids[k], self.roi_id)]
        question_ids = [self.user_id, *self._text_ids(question)]
        if self.config.layout == "question_first":
            return image + question_ids + boxes + [self.assistant_id]
        return image + boxes + question_ids + [self.assistant_id]

    def example(
        self,
        question: str,
        num_boxes: int,
        answer: str | None = None,
        groups: Sequence[Sequence[int]] = (),
        rng: random.Random | None = None,
    ) -> dict:
        """Token ids of one turn; with an answer also labels, the index sets, the group targets and
        the choices: each step inside an objects block where constrained decoding chooses between
        the unused indices and stopping (``</objects>``, or "None" as a block's first token), as
        (label position, indices used so far in the block, the stop token).

        With ``rng`` the indices inside each objects block are shuffled, so no order is learned.
        """
        prompt = self.prompt_ids(question, num_boxes)
        if answer is None:
            return {"input_ids": prompt}
        answer_ids = [*self._text_ids(answer), self.eos_id]
        if rng is not None:
            answer_ids = self._shuffle_blocks(answer_ids, rng)
        ids = prompt + answer_ids
        labels = [IGNORE] * len(prompt) + answer_ids
        index_sets: list[tuple[int, list[int]]] = []  # (label position, allowed members)
        group_positions: list[int] = []
        group_members: list[list[int]] = []
        choices: list[tuple[int, list[int], int]] = []
        g = -1
        remaining: set[int] = set()
        used: list[int] | None = None  # indices of the open objects block; None outside blocks
        for p in range(len(prompt), len(ids)):
            t = ids[p]
            if used is not None:
                stop = self.objects_close if used or self.none_id is None else self.none_id
                k = self.obj_index.get(t)
                if t == stop or (k is not None and k < num_boxes and k not in used):
                    choices.append((p, list(used), stop))
                if t in (self.objects_close, self.none_id):  # after "None" only </objects> can follow
                    used = None
                elif k is not None:
                    used = [*used, k]
            if t == self.objects_open:
                g += 1
                members = list(groups[g]) if g < len(groups) else []
                remaining = set(members)
                group_positions.append(p)
                group_members.append(members)
                used = []
            elif t in self.obj_index and self.obj_index[t] in remaining:
                index_sets.append((p, sorted(remaining)))
                remaining = remaining - {self.obj_index[t]}
            elif t == self.objects_close:
                remaining = set()
        return {
            "input_ids": ids,
            "labels": labels,
            "index_sets": index_sets,
            "group_positions": group_positions,
            "group_members": group_members,
            "choices": choices,
        }

    def _shuffle_blocks(self, ids: list[int], rng: random.Random) -> list[int]:
        """Shuffle the index tokens inside each ``<objects>`` block; everything else stays in place."""
        out: list[int] = []
        block: list[int] | None = None  # indices of the open block
        for t in ids:
            if block is not None and t in self.obj_index:
                block.append(t)
                continue
            if block is not None and t == self.objects_close:
                rng.shuffle(block)
                out += block
                block = None
            out.append(t)
            if t == self.objects_open:
                block = []
        return out + (block or [])

    def collate(self, examples: Sequence[dict], boxes: Sequence[np.ndarray], pad_left: bool = False) -> dict:
        """Pad a batch. ``boxes[i]`` are example i's normalised xyxy boxes."""
        b = len(examples)
        t = max(len(e["input_ids"]) for e in examples)
        k = max(1, max(len(x) for x in boxes))
        input_ids = torch.full((b, t), self.pad_id, dtype=torch.long)
        attention = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), IGNORE, dtype=torch.long)
        box_t = torch.zeros(b, k, 4)
        box_mask = torch.zeros(b, k, dtype=torch.bool)
        has_labels = "labels" in examples[0]
        index_sets = torch.zeros(b, t, k, dtype=torch.bool) if has_labels else None
        n_groups = max((len(e.get("group_positions", [])) for e in examples), default=0)
        group_positions = torch.full((b, max(1, n_groups)), -1, dtype=torch.long)
        group_members = torch.zeros(b, max(1, n_groups), k, dtype=torch.bool)
        choice_stop = torch.full((b, t), -1, dtype=torch.long)
        choice_used = torch.zeros(b, t, k, dtype=torch.bool)
        for i, (e, bx) in enumerate(zip(examples, boxes, strict=True)):
            n = len(e["input_ids"])
            off = t - n if pad_left else 0
            input_ids[i, off : off + n] = torch.tensor(e["input_ids"])
            attention[i, off : off + n] = 1
            if len(bx):
                box_t[i, : len(bx)] = torch.as_tensor(np.asarray(bx), dtype=torch.float32)
                box_mask[i, : len(bx)] = True
            if has_labels:
                labels[i, off : off + n] = torch.tensor(e["labels"])
                for p, allowed in e["index_sets"]:
                    index_sets[i, off + p, allowed] = True  # type: ignore[index]
                for j, (p, members) in enumerate(zip(e["group_positions"], e["group_members"], strict=True)):
                    group_positions[i, j] = off + p
                    group_members[i, j, members] = True
                for p, used, stop in e.get("choices", []):
                    choice_stop[i, off + p] = stop
                    choice_used[i, off + p, used] = True
        batch = {"input_ids": input_ids, "attention_mask": attention, "boxes": box_t, "box_mask": box_mask}
        if index_sets is not None:
            batch.update(labels=labels, index_sets=index_sets, group_positions=group_positions,
                         group_members=group_members, choice_stop=choice_stop, choice_used=choice_used)  # fmt: skip
        return batch
