"""RexSeek's configuration: a ``Qwen2Config`` under ``model_type`` "rexseek_qwen", as the release writes it.

The released ``config.json`` holds the language model's fields and a few of the vision side's
(``mm_vision_select_layer`` -2, ``mm_vision_select_feature`` "patch"); the towers' sizes, 768 and 336, are
fixed in RexSeek's code, so ``perceive.models.rexseek.modeling_rexseek`` reads them from the weights' shapes.
"""

from __future__ import annotations

from transformers import Qwen2Config


class RexSeekConfig(Qwen2Config):
    model_type = "rexseek_qwen"

    def __init__(self, mm_vision_select_layer: int = -2, mm_vision_select_feature: str = "patch", **kwargs) -> None:
        self.mm_vision_select_layer = mm_vision_select_layer  # which CLIP hidden state gives the image tokens
        self.mm_vision_select_feature = mm_vision_select_feature  # "patch": without the class token
        super().__init__(**kwargs)
