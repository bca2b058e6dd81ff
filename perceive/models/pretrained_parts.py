"""A model's parts from local transformers folders: ``perceive train --vision-tower DIR --convnext DIR
--language-model DIR``, for the models built on the dual vision encoder and a Qwen2 (ChatRex, MVP-LM, REF-VLM).

Each folder is what ``save_pretrained`` writes and what the model hubs hold: ``config.json`` and safetensors weights
(``model.safetensors`` or shards listed by ``model.safetensors.index.json``).
- vision tower: a CLIP or SigLIP model, whole (``model_type`` "clip", "siglip": its text half is not used) or its
  vision model alone ("clip_vision_model", "siglip_vision_model");
- ConvNeXt: a ConvNeXt model, with or without its classifier ("convnext");
- language model: a Qwen2 or Qwen2.5 causal LM ("qwen2") with its tokenizer.

Their configurations replace the named size's (the ViT's input size becomes the model's low resolution), the
language model's tokenizer replaces the world's, perceive's tokens are added to it, and the embeddings grow to
hold them: each new token's row starts at the mean of the pretrained rows. Weights are read as safetensors only,
tensor by tensor; no code in a folder is run.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from transformers import PreTrainedModel

from perceive.models.folder_checks import one_line, read_json_object, weight_files, weight_misfit, weight_shapes
from perceive.perceiver import ModelFolderError

# model_type -> (the part's model_type in perceive's configuration, the field holding it in a whole model's config)
VISION_TYPES = {
    "clip": ("clip_vision_model", "vision_config"),
    "clip_vision_model": ("clip_vision_model", None),
    "siglip": ("siglip_vision_model", "vision_config"),
    "siglip_vision_model": ("siglip_vision_model", None),
}
# what transformers writes into config.json that is no part of the architecture
_NOT_ARCHITECTURE = ("transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype",
                     "auto_map", "use_cache")  # fmt: skip
# a vision tower's weights that no perceive model has: a whole CLIP's or SigLIP's text half and SigLIP's pooling head
_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias", "head.")
# buffers some transformers versions save and others do not
_BUFFERS = ("position_ids",)


@dataclass(frozen=True)
class PretrainedParts:
    """Local folders that replace a configuration's parts; None keeps the named size's part, trained from scratch."""

    vision_tower: Path | None = None
    convnext: Path | None = None
    language_model: Path | None = None

    def __post_init__(self) -> None:
        for name, folder in self.folders().items():
            if not (folder / "config.json").is_file():
                found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
                raise FileNotFoundError(f"--{name.replace('_', '-')} {folder} has no config.json "
                                        f"(found: {', '.join(found) or 'nothing'})")  # fmt: skip

    def folders(self) -> dict[str, Path]:
        named = {"vision_tower": self.vision_tower, "convnext": self.convnext, "language_model": self.language_model}
        return {k: Path(v) for k, v in named.items() if v is not None}

    def __bool__(self) -> bool:
        return bool(self.folders())

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.folders().items()}

    def model_overrides(self, named: dict, tokenizer) -> dict:
        """The configuration fields the folders and ``tokenizer`` decide, over the named size ``named``:
        ``vision_config`` and ``low_resolution``, ``convnext_config``, ``text_config`` (its vocabulary holds every
        id of ``tokenizer`` and every row of a pretrained language model)."""
        out = self.config_overrides()
        text = out.get("text_config", named["text_config"])
        pretrained = int(text.get("vocab_size", 0)) if self.language_model is not None else 0
        return {**out, "text_config": {**text, "vocab_size": max(len(tokenizer), pretrained)}}

    def config_overrides(self) -> dict:
        out: dict = {}
        if self.vision_tower is not None:
            vision = vision_config(Path(self.vision_tower))
            out["vision_config"] = vision
            out["low_resolution"] = int(vision["image_size"])
        if self.convnext is not None:
            out["convnext_config"] = part_config(Path(self.convnext), ("convnext",))
        if self.language_model is not None:
            out["text_config"] = part_config(Path(self.language_model), ("qwen2",))
        return out

    def tokenizer(self, added_tokens: Iterable[str] = ()):
        """The language model's tokenizer with perceive's tokens and a model's ``added_tokens``; None without one."""
        from perceive.tokenization import add_tokens, load_tokenizer

        if self.language_model is None:
            return None
        tokenizer = load_tokenizer(self.language_model)
        add_tokens(tokenizer, added_tokens)
        return tokenizer

    def load_into(self, model: Any, tokenizer) -> dict[str, int]:
        """Copy the folders' weights into ``model``'s ``vision.vit``, ``vision.convnext`` and ``language_model``;
        the rows of the tokens the folder's tokenizer lacks start at the mean of its rows. Returns the tensors
        read per part. Weights of a part's name or shape that the model lacks, or the reverse, are an error."""
        read: dict[str, int] = {}
        if self.vision_tower is not None:
            read["vision_tower"] = copy_weights(model.vision.vit, Path(self.vision_tower), ("vision_model.",),
                                                skip=_NOT_VISION)  # fmt: skip
        if self.convnext is not None:
            read["convnext"] = copy_weights(model.vision.convnext, Path(self.convnext), ("convnext.",),
                                            skip=("classifier.",))  # fmt: skip
        if self.language_model is not None:
            lm = model.language_model
            read["language_model"] = copy_weights(lm, Path(self.language_model), (), resized=True)
            new = new_token_ids(tokenizer, Path(self.language_model))
            pretrained_rows(lm, tokenizer, new)
        return read


def part_config(folder: Path, model_types: tuple[str, ...]) -> dict:
    raw = read_json_object(folder / "config.json")
    if raw.get("model_type") not in model_types:
        raise ModelFolderError(f"{folder / 'config.json'}: model_type {raw.get('model_type')!r} is not "
                               f"{' or '.join(repr(t) for t in model_types)}")  # fmt: skip
    return {k: v for k, v in raw.items() if k not in _NOT_ARCHITECTURE}


def vision_config(folder: Path) -> dict:
    """A CLIP's or SigLIP's vision configuration, from its whole model's folder or its vision model's."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    raw = read_json_object(folder / "config.json")
    kind = raw.get("model_type")
    if kind not in VISION_TYPES:
        raise ModelFolderError(f"{folder / 'config.json'}: model_type {kind!r} is no vision tower perceive reads "
                               f"({', '.join(VISION_TYPES)})")  # fmt: skip
    part_type, field = VISION_TYPES[kind]
    fields = raw.get(field, {}) if field else raw
    if not isinstance(fields, dict):
        raise ModelFolderError(f"{folder / 'config.json'}: {field} is not a JSON object")
    config_class = SiglipVisionConfig if part_type.startswith("siglip") else CLIPVisionConfig
    try:  # through the class, so that fields a whole model's config leaves to the defaults are filled in
        full = config_class(**{k: v for k, v in fields.items() if k not in (*_NOT_ARCHITECTURE, "model_type")})
    except (TypeError, ValueError) as e:
        raise ModelFolderError(f"{folder / 'config.json'}: {one_line(e)}") from None
    out = {k: v for k, v in full.to_diff_dict().items() if k not in _NOT_ARCHITECTURE}
    if part_type.startswith("siglip"):
        out["vision_use_head"] = False  # the image tokens are the last hidden states; the pooling head is unused
    return {**out, "model_type": part_type}


def copy_weights(
    module: torch.nn.Module, folder: Path, strip: tuple[str, ...], skip: tuple[str, ...] = (), resized: bool = False
) -> int:
    """Copy ``folder``'s tensors into ``module``'s (names after removing a prefix of ``strip``: transformers 4 saved
    a vision model under ``vision_model.``, 5 saves it bare), one at a time, passing over those named ``skip...``.
    The files' headers are checked first (``weight_misfit``): every tensor of ``module`` must be found (tied ones
    once), and every tensor read must fit, except the embedding rows of a ``resized`` vocabulary (the first rows are
    copied). Returns the tensors copied."""
    own = module.state_dict()
    files = weight_files(folder)
    sources: dict[str, tuple[Path, str]] = {}  # the module's name -> the file and the key it is read from
    shapes: dict[str, list[int]] = {}
    for path in files:
        for key, shape in weight_shapes(path).items():
            name = next((key[len(p) :] for p in strip if key.startswith(p)), key)
            if name.startswith(skip) or (name not in own and name.endswith(_BUFFERS)):
                continue
            target = own.get(name)
            if resized and target is not None and target.dim() == len(shape) == 2 and target.shape[1] == shape[1]:
                shape = list(target.shape)  # a vocabulary of another size: its first rows are copied
            sources[name], shapes[name] = (path, key), shape
    misfit = weight_misfit(module, shapes, {name: key for name, (_, key) in sources.items()}, "the model's")
    if misfit:
        raise ModelFolderError(f"{folder}'s weights do not fit its config.json: {misfit}")
    with torch.no_grad():
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name, (source, key) in sources.items():
                    if source != path:
                        continue
                    tensor, target = f.get_tensor(key), own[name]
                    if tensor.shape == target.shape:
                        target.copy_(tensor)
                    else:  # a resized vocabulary: the rows both have
                        target[: len(tensor)].copy_(tensor[: len(target)])
    return len(sources)


def new_token_ids(tokenizer, folder: Path) -> list[int]:
    """The ids of ``tokenizer``'s tokens that the folder's own tokenizer lacks (perceive's and a model's)."""
    from transformers import AutoTokenizer

    try:
        original = set(AutoTokenizer.from_pretrained(str(folder)).get_vocab())
    except (OSError, ValueError, TypeError) as e:
        raise ModelFolderError(f"{folder}: its tokenizer does not load: {one_line(e)}") from None
    return sorted(i for t, i in tokenizer.get_vocab().items() if t not in original)


def pretrained_rows(lm: PreTrainedModel, tokenizer, new: list[int]) -> None:
    """Start the input and output embedding rows of the ``new`` token ids at the mean of the other tokenizer ids'
    rows (rows past the tokenizer, padding, are left as read)."""
    known = sorted(set(tokenizer.get_vocab().values()) - set(new))
    with torch.no_grad():
        tables = [cast(torch.Tensor, m.weight) for m in (lm.get_input_embeddings(), lm.get_output_embeddings())]
        for table in {id(t): t for t in tables}.values():  # a tied table once
            table[new] = table[known].mean(dim=0, keepdim=True)
