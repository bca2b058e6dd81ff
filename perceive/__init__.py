"""perceive: perception MLLMs that understand an image and point at exact objects in it.

``perceive.load(path)`` gives any saved model, ready to ``ask(image, question)``; the names below are
imported on first use, so ``import perceive`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "load": "perceive.perceiver",
    "load_released_upn": "perceive.models.upn.released_loading",
    "Perceiver": "perceive.perceiver",
    "Answer": "perceive.answer",
    "GroundedObject": "perceive.answer",
    "VisualPrompt": "perceive.prompts",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'perceive' has no attribute {name!r}")
