"""Which ``Perceiver`` loads a folder: its ``config.json``'s ``model_type`` -> the model's class.

A model registers here by naming the module and class of its ``Perceiver`` (imported only when a folder
of that type is loaded), with every ``model_type`` its folders have been saved under.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from perceive.perceiver import Perceiver

PERCEIVERS = {
    # the retrieval model; "perceive_retrieval" is how folders saved before it was named ChatRex say so
    "chatrex": ("perceive.models.chatrex.perceiver_chatrex", "ChatRexPerceiver"),
    "perceive_retrieval": ("perceive.models.chatrex.perceiver_chatrex", "ChatRexPerceiver"),
    # the released RexSeek-3B folder (IDEA-Research/RexSeek), read without its own code
    "rexseek_qwen": ("perceive.models.rexseek.perceiver_rexseek", "RexSeekPerceiver"),
    # MVP-LM: a <PER> token drives a box-and-mask query decoder
    "mvp": ("perceive.models.mvp.perceiver_mvp", "MvpPerceiver"),
    # REF-VLM: TRP answers whose <REF> tokens drive box, mask and keypoint decoders; visual prompts in
    "refvlm": ("perceive.models.refvlm.perceiver_refvlm", "RefVlmPerceiver"),
}


def known_model_types() -> list[str]:
    return list(PERCEIVERS)


def perceiver_class(model_type: str) -> type[Perceiver] | None:
    """The ``Perceiver`` subclass that loads folders of ``model_type``, or None for a type perceive does not know."""
    entry = PERCEIVERS.get(model_type)
    if entry is None:
        return None
    module, name = entry
    return getattr(importlib.import_module(module), name)
