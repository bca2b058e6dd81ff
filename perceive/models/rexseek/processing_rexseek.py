"""RexSeek's inputs as its release prepares them (``prepare_input_for_rexseek``).

- The image is padded to a centred square with CLIP's mean colour (122, 116, 104), resized to the ConvNeXt
  size (768) with PIL's bicubic filter, scaled to [0, 1] and normalised with CLIP's mean and std; CLIP's input
  (336) is that tensor resized bilinearly.
- Boxes (xyxy pixels) are shifted by the padding and scaled by 768 / the square's side.
- The prompt is Qwen's chat turn without a system message:
  ``<|im_start|>user\\n<image>\\n<obj0><objfeat><obj1><objfeat>...\\n{question}<|im_end|>\\n<|im_start|>assistant\\n``;
  the text between the ``<image>`` and ``<objfeat>`` placeholders is tokenized piece by piece (as the release
  does: it decides where BPE merges may cross) and each placeholder becomes the model's own id for it.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from perceive.models.rexseek.modeling_rexseek import IMAGE_PLACEHOLDER, OBJECT_PLACEHOLDER

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_BOXES = 100  # <obj0> .. <obj99>
_PLACEHOLDERS = re.compile(r"(<image>|<objfeat>)")


def square_pad(image: np.ndarray) -> tuple[Image.Image, int, int]:
    """The image centred on a square of CLIP's mean colour, and the left and top padding."""
    h, w = image.shape[:2]
    side = max(w, h)
    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    canvas = Image.new("RGB", (side, side), fill)
    left, top = (side - w) // 2, (side - h) // 2
    canvas.paste(Image.fromarray(image), (left, top))
    return canvas, left, top


def image_inputs(image: np.ndarray, aux_size: int, clip_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ConvNeXt input ``[3, aux, aux]``, CLIP input ``[3, clip, clip]``) of an RGB uint8 image."""
    square, _, _ = square_pad(image)
    resized = np.asarray(square.resize((aux_size, aux_size), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    aux = (torch.from_numpy(resized) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    aux = aux.permute(2, 0, 1).contiguous()
    clip = F.interpolate(aux[None], size=(clip_size, clip_size), mode="bilinear", align_corners=False)[0]
    return aux, clip


def box_inputs(boxes: np.ndarray, width: int, height: int, aux_size: int) -> torch.Tensor:
    """Pixel boxes (xyxy) in the padded, resized frame of ``image_inputs``."""
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    shifted = np.asarray(boxes, dtype=np.float64) + np.array([left, top, left, top])
    return torch.tensor(shifted * (aux_size / side), dtype=torch.float32)


def prompt(question: str, num_boxes: int) -> str:
    objects = "".join(f"<obj{k}><objfeat>" for k in range(num_boxes))
    body = "<image>\n" + objects + "\n" + question.replace("<image>", "")
    return f"<|im_start|>user\n{body}<|im_end|>\n<|im_start|>assistant\n"


def prompt_ids(tokenizer, question: str, num_boxes: int) -> list[int]:
    """The prompt's ids, ``IMAGE_PLACEHOLDER`` and ``OBJECT_PLACEHOLDER`` where the image and each box go."""
    ids: list[int] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    for piece in _PLACEHOLDERS.split(prompt(question, num_boxes)):
        if piece == "<image>":
            ids.append(IMAGE_PLACEHOLDER)
        elif piece == "<objfeat>":
            ids.append(OBJECT_PLACEHOLDER)
        elif piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False))
    return ids
