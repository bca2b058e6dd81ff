"""Checks that a model folder is what it says before anything is built from it: its configuration files are
JSON objects whose fields have the types the configuration class takes, its weights are complete safetensors
files, and the model its configuration describes, built on the meta device (no memory), has exactly the
weights' names and shapes. A folder that fails gets one ``ModelFolderError`` naming the file and what is wrong,
instead of a traceback, or a model of the default size (12 B parameters) built for weights it does not fit.
"""

from __future__ import annotations

import json
import re
import struct
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from perceive.perceiver import ModelFolderError

# a configuration is a few kilobytes; a larger file is no configuration, and is not read whole to find out
MAX_CONFIG_BYTES = 16 * 2**20
SHOWN_DIFFERENCES = 3
# the fields that count layers: transformers' num_hidden_layers, ConvNeXt's depths, perceive's relation_layers
LAYER_COUNT_FIELD = re.compile(r"(^|_)(layers|depths)$")
# what a configuration's sizes or a model's constructor raise on values that build no model
BUILD_ERRORS = (TypeError, ValueError, ArithmeticError, LookupError, RuntimeError, StrictDataclassError)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (transformers' validation errors span several), cut at ``limit``
    characters (torch's carry a C++ stack)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json(path: Path) -> Any:
    """A configuration file's JSON value."""
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ModelFolderError(f"{path} is {path.stat().st_size} bytes, too large for a configuration")
    try:
        return json.loads(path.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ModelFolderError(f"{path} is not a configuration: its JSON is nested too deeply") from None


def read_json_object(path: Path) -> dict:
    """The fields of a configuration file, which must be a JSON object."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{path} is not a JSON object")
    return raw


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type ``hint`` names (a JSON array for a list or tuple); a hint this does
    not know is left to the configuration class."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # JSON's true is no size
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        items = [a for a in args if a is not Ellipsis]
        return isinstance(value, list) and (len(items) != 1 or all(_fits(v, items[0]) for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict) and (len(args) != 2 or all(_fits(v, args[1]) for v in value.values()))
    return True


def _describe(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_field_types(config_class: type[PretrainedConfig], raw: Mapping, path: Path) -> None:
    """Every field of ``raw`` that ``config_class`` takes as an argument has the argument's type."""
    hints = get_type_hints(config_class.__init__)
    for name, value in raw.items():
        if name in hints and name != "return" and not _fits(value, hints[name]):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ModelFolderError(f"{path}: field {name}: expected {_describe(hints[name])}, got {shown}")


def build_config(config_class: type[PretrainedConfig], raw: dict, path: Path) -> Any:
    """``config_class`` of the fields of ``path`` (read as ``raw``), type-checked; what the class refuses
    is a ``ModelFolderError`` naming the file."""
    check_field_types(config_class, raw, path)
    try:
        return config_class.from_dict(raw)
    except BUILD_ERRORS as e:
        raise ModelFolderError(f"{path}: {one_line(e)}") from None


def check_parts(path: Path, parts: Mapping[str, Callable[[], object]]) -> None:
    """Build each part's configuration (field name -> the method that builds it from that field)."""
    for field, build in parts.items():
        try:
            build()
        except BUILD_ERRORS as e:
            raise ModelFolderError(f"{path}: field {field}: {one_line(e)}") from None


def weight_shapes(path: Path) -> dict[str, list[int]]:
    """Every tensor's shape in a safetensors file, read from its header (no tensor is loaded), after checking
    the file is complete: its data section as long as the header says."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - no __iter__
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(f"{path} is not a complete safetensors file: {one_line(e)}") from None
    # safe_open checks this too in the safetensors versions we know; a file cut after its header must not
    # wait to fail until a tensor is read, whatever the version
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
    data = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    size, expected = path.stat().st_size, 8 + header_size + data
    if size != expected:
        raise ModelFolderError(f"{path} is not a complete safetensors file: its header describes {expected} bytes, "
                               f"the file has {size}")  # fmt: skip
    return shapes


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the shards its index lists, or ``model.safetensors``."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index} has no weight_map")
        files = sorted({folder / str(name) for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file() or f.parent != folder]
        if missing:
            raise ModelFolderError(f"{index} lists {', '.join(missing)}, not in {folder}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p.name for p in folder.iterdir())
    raise ModelFolderError(f"{folder} has no model.safetensors nor model.safetensors.index.json (found: "
                           f"{', '.join(found[:12]) or 'nothing'}); .bin and .pth weights are not read")  # fmt: skip


def _layer_counts(raw: Any, prefix: str = "") -> dict[str, int]:
    """The layer counts a configuration sets, field name -> layers, its parts' included."""
    counts: dict[str, int] = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            counts.update(_layer_counts(value, f"{name}."))
        elif LAYER_COUNT_FIELD.search(str(key)):
            items = value if isinstance(value, list) else [value]
            counts[name] = sum(v for v in items if isinstance(v, int) and not isinstance(v, bool))
    return counts


def check_layer_counts(raw: dict, tensors: int, config_path: Path, weights_path: Path) -> None:
    """Each layer has at least one weight: a configuration of more layers than its weights have tensors is
    refused before building it, which takes time by the layer even on the meta device."""
    counts = _layer_counts(raw)
    if sum(counts.values()) > tensors:
        fields = ", ".join(f"{k} {v}" for k, v in counts.items() if v)
        raise ModelFolderError(f"{config_path} describes {sum(counts.values())} layers ({fields}), more than the "
                               f"{tensors} tensors of {weights_path}")  # fmt: skip


def weight_misfit(
    model: torch.nn.Module, shapes: Mapping[str, list[int]], shown: Mapping[str, str] | None = None,
    model_side: str = "the configuration",
) -> str:  # fmt: skip
    """What keeps weights of ``shapes`` (name -> shape) from filling ``model`` exactly: the missing, unexpected and
    differently shaped names, a few of each (a weight shown under its name in ``shown`` where it has one); "" when they
    fit. Tied weights are saved once, under any of their names."""
    shown = shown or {}
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(parameter), []).append(name)
    saved_as = {name: names for names in tied.values() for name in names}
    missing = [k for k in expected if k not in shapes and not any(n in shapes for n in saved_as.get(k, []))]
    unexpected = [shown.get(k, k) for k in shapes if k not in expected]
    reshaped = [f"{shown.get(k, k)} {shapes[k]} ({model_side}: {expected[k]})" for k in shapes
                if k in expected and shapes[k] != expected[k]]  # fmt: skip
    found = [(what, names) for what, names in (("missing", missing), ("unexpected", unexpected),
                                               ("differently shaped", reshaped)) if names]  # fmt: skip
    return "; ".join(f"{len(names)} {what}: {', '.join(names[:SHOWN_DIFFERENCES])}" + (", ..." if
                     len(names) > SHOWN_DIFFERENCES else "") for what, names in found)  # fmt: skip


def check_weights_fit(
    build: Callable[[], torch.nn.Module],
    shapes: Mapping[str, list[int]],
    config_path: Path,
    weights_path: Path,
) -> None:
    """The model ``build`` makes, built on the meta device (shapes only, no memory), has a tensor of each
    name and shape in ``shapes`` (the weights file's, under today's names) and no other (``weight_misfit``)."""
    try:
        with torch.device("meta"):
            model = build()
    except BUILD_ERRORS as e:
        raise ModelFolderError(f"{config_path} describes no model that builds: {one_line(e)}") from None
    misfit = weight_misfit(model, shapes)
    if misfit:
        raise ModelFolderError(f"{weights_path} does not fit {config_path}: {misfit}")


def check_pretrained_folder(folder: Path, model_class: type[PreTrainedModel]) -> Any:
    """The configuration of a folder that ``model_class.save_pretrained`` wrote (``config.json`` and
    ``model.safetensors``), after checking the folder holds such a model and its weights fit it."""
    config_class = model_class.config_class
    if config_class is None:
        raise TypeError(f"{model_class.__name__} names no config_class")
    config_path, weights = folder / "config.json", folder / "model.safetensors"
    raw = read_json_object(config_path)
    if raw.get("model_type") != config_class.model_type:
        raise ModelFolderError(f"{config_path}: model_type {raw.get('model_type')!r} is not "
                               f"{config_class.model_type!r} ({model_class.__name__})")  # fmt: skip
    config, shapes = build_config(config_class, raw, config_path), weight_shapes(weights)
    check_layer_counts(raw, len(shapes), config_path, weights)
    check_weights_fit(lambda: model_class(config), shapes, config_path, weights)
    return config


def check_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    placeholders: Sequence[tuple[str, int, str]],
    config_path: Path,
    tokenizer_folder: Path,
) -> None:
    """The tokenizer fits the model: its ids all have a row of the language model's ``vocab_size``, and each
    placeholder (field of ``config_path``, the id it says, the token it stands for) is the tokenizer's id of
    that token."""
    size = len(tokenizer)
    if size > vocab_size:
        raise ModelFolderError(f"{tokenizer_folder}: the tokenizer has {size} tokens, but {config_path} gives the "
                               f"language model {vocab_size} (text_config.vocab_size): ids past it have no "
                               f"embedding")  # fmt: skip
    for field, token_id, token in placeholders:
        actual = tokenizer.convert_tokens_to_ids(token)
        if token_id == actual:
            continue
        if not 0 <= token_id < size:
            raise ModelFolderError(f"{config_path}: field {field} is {token_id}, beyond the {size} tokens of the "
                                   f"tokenizer in {tokenizer_folder}")  # fmt: skip
        raise ModelFolderError(f"{config_path}: field {field} is {token_id}, but the tokenizer in {tokenizer_folder} "
                               f"has {token} at {actual}")  # fmt: skip
