"""One way to use any perceive model: ``perceive.load(path)`` (or ``Perceiver.from_pretrained(path)``)
reads the folder's ``config.json``, picks the model its ``model_type`` names, and returns a ``Perceiver``
whose ``ask(image, question, boxes=None, prompts=None)`` gives an ``Answer``.

Whatever the model, an ``Answer``'s objects carry a phrase, a box in the input image's pixels and a score,
and a mask (COCO RLE) or keypoints when the model makes them (``perceive.answer``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perceive.answer import Answer
from perceive.prompts import VisualPrompt

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"


@dataclass
class Encoded:
    """An image ready for questions, by default as it was given (``Perceiver.encode_batch``)."""

    array: np.ndarray
    boxes: list | None = None


class ModelFolderError(ValueError):
    """A folder that is not a model perceive can load: the message names the file and what is wrong."""


class Perceiver(ABC):
    """A trained model with its processor, ready to answer questions about images."""

    model_type: str = ""
    takes_prompts: bool = False  # whether ``answer`` reads visual prompts (REF-VLM's <region>)
    _device: Any = None  # torch.device once ``to`` moved the model; the CPU before

    @property
    def device(self) -> Any:
        """The ``torch.device`` the model's weights are on, where a perceiver makes its inputs."""
        import torch

        return self._device if self._device is not None else torch.device("cpu")

    def to(self, device: Any) -> Perceiver:
        """Move the model (every module the perceiver holds) to ``device``: a ``torch.device`` or ``auto``, ``cuda``,
        ``cuda:N``, ``mps``, ``cpu`` (``perceive.devices.resolve_device``); returns the perceiver."""
        import torch

        from perceive.devices import resolve_device

        self._device = resolve_device(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(self._device)
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None) -> Perceiver:
        """The model in ``path`` (default: the shipped ``checkpoints/tiny``). On ``Perceiver`` itself, the
        folder's configuration picks the model; on a model's own class, the folder must hold that model."""
        if cls is Perceiver:
            return load(path)
        folder = Path(path) if path is not None else DEFAULT_MODEL
        model_type = read_model_type(folder)
        if model_type not in cls.model_types():
            raise ModelFolderError(f"{folder / 'config.json'}: model_type {model_type!r} is not a {cls.__name__} model")
        return cls.from_folder(folder)

    @classmethod
    @abstractmethod
    def model_types(cls) -> tuple[str, ...]:
        """The ``model_type`` values of the folders this class loads (the current one first)."""

    @classmethod
    @abstractmethod
    def from_folder(cls, folder: Path) -> Perceiver:
        """Load from a folder whose ``config.json`` names one of ``model_types``."""

    @abstractmethod
    def ask_batch(
        self,
        images: list,
        questions: list[str],
        boxes: list | None = None,
        prompts: list[list[VisualPrompt] | None] | None = None,
    ) -> list[Answer]:
        """One answer per (image, question); ``boxes[i]`` are the user's boxes for image i (xyxy pixels, or
        None), ``prompts[i]`` its visual prompts."""

    def encode_batch(self, images: list, boxes: list | None = None) -> list:
        """Images (and their boxes) made ready for any number of questions (``answer``). A model that encodes
        an image once for many questions overrides both; by default the image is kept as it is."""
        from perceive.images import load_image

        return [Encoded(load_image(im), None if boxes is None else boxes[i]) for i, im in enumerate(images)]

    def answer(self, encoded: list, questions: list[str]) -> list[Answer]:
        """One answer per (``encode_batch`` result, question)."""
        return self.ask_batch([e.array for e in encoded], questions, boxes=[e.boxes for e in encoded])

    def ask(
        self,
        image,
        question: str,
        boxes=None,
        prompts: list[VisualPrompt] | None = None,
    ) -> Answer:
        """Answer ``question`` about ``image`` (a path, bytes, a PIL image or an array). ``boxes`` (xyxy pixels)
        are the user's own boxes where the model chooses among boxes (RexSeek's use: a detector's boxes in,
        the model picks); ``prompts`` are visual prompts where the model takes them."""
        return self.ask_batch([image], [question], None if boxes is None else [boxes],
                              None if prompts is None else [prompts])[0]  # fmt: skip


def read_model_type(folder: Path) -> str:
    """The ``model_type`` of ``folder/config.json``, after checking the file is a JSON object that names one."""
    config = folder / "config.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    if not config.is_file():
        found = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "") if found else "nothing"
        raise FileNotFoundError(f"{folder} is not a model folder: config.json is missing (found: {shown})")
    from perceive.models.folder_checks import read_json

    raw = read_json(config)
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ModelFolderError(f'{config} names no model_type (a JSON object with "model_type" is expected)')
    return raw["model_type"]


def load(path: str | Path | None = None, device: Any = "cpu") -> Perceiver:
    """The model in ``path`` (default: the shipped ``checkpoints/tiny``), whatever its kind, on ``device`` (``auto``,
    ``cuda``, ``mps``, ``cpu``: ``Perceiver.to``). A folder that is no model perceive can load (a configuration,
    weights or tokenizer missing, malformed, or not fitting each other) is a ``ModelFolderError`` or
    ``FileNotFoundError`` naming the file, raised before the model is built."""
    from perceive.devices import resolve_device
    from perceive.models.auto import perceiver_class

    target = resolve_device(device)  # a device this machine lacks fails before the model is read
    folder = Path(path) if path is not None else DEFAULT_MODEL
    model_type = read_model_type(folder)
    cls = perceiver_class(model_type)
    if cls is None:
        from perceive.models.auto import known_model_types
        from perceive.models.folder_checks import read_json_object

        remote = read_json_object(folder / "config.json").get("auto_map")
        code = f" (its model is defined by the code inside the folder, {remote}, which perceive never runs)"
        raise ModelFolderError(f"{folder / 'config.json'}: model_type {model_type!r} is not a perceive model"
                               f"{code if remote else ''}; known: {', '.join(known_model_types())}")  # fmt: skip
    return cls.from_folder(folder).to(target)
