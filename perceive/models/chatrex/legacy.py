"""Folders saved before the retrieval model was named ChatRex (``model_type`` ``"perceive_retrieval"``; the
shipped ``checkpoints/tiny`` is one): their configuration and weight names, read as today's.

What changed: the vision towers and the object encoder's projections moved into their shared modules
(``vision.*``, ``object_encoder.*``), and the attribute heads, which such a folder's configuration does not
list, are now named by the configuration. Their class counts are read from the weights; their order, the
order of the label columns the model was trained on, was fixed then: the heads on the object features,
then those on the RoI grid (``holding_attributes``), each group in the order of their names.
"""

from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file

from perceive.models.chatrex.configuration_chatrex import ChatRexConfig
from perceive.models.chatrex.modeling_chatrex import ChatRexForConditionalGeneration
from perceive.models.folder_checks import (
    BUILD_ERRORS,
    build_config,
    check_field_types,
    one_line,
    read_json_object,
    weight_shapes,
)
from perceive.perceiver import ModelFolderError

LEGACY_MODEL_TYPE = "perceive_retrieval"
RENAMED_PREFIXES = {
    "vit.": "vision.vit.",
    "convnext.": "vision.convnext.",
    "roi_proj.": "object_encoder.roi_proj.",
    "position_proj.": "object_encoder.position_proj.",
}
# the order counts such a model was built with: by category, and by category and colour
LEGACY_ORDER_GROUPINGS = [["category"], ["category", "color"]]
_HEAD = re.compile(r"^attribute_heads\.(?P<name>[^.]+)\.weight$")


def migrate_config(raw: dict, shapes: dict[str, list[int]]) -> dict:
    """A legacy ``config.json``'s fields as ``ChatRexConfig`` takes them, given the weights' shapes."""
    cfg = {k: v for k, v in raw.items() if k != "holding_attributes"}
    heads = {m["name"]: shapes[k] for k in shapes if (m := _HEAD.match(k))}
    object_dim = int(raw.get("object_dim", 256))
    on_features = sorted(n for n, (_, d_in) in heads.items() if d_in == object_dim)
    on_grid = sorted(n for n in heads if n not in on_features)
    cfg["attribute_heads"] = {n: heads[n][0] for n in (*on_features, *on_grid)}
    cfg["grid_attribute_heads"] = on_grid
    if raw.get("order_embedding") not in (None, "none", False):
        cfg["order_groupings"] = LEGACY_ORDER_GROUPINGS
    cfg["model_type"] = ChatRexConfig.model_type
    cfg["architectures"] = [ChatRexForConditionalGeneration.__name__]
    return cfg


def migrate_key(key: str) -> str:
    for old, new in RENAMED_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def legacy_config(raw: dict, shapes: dict[str, list[int]], config_path: Path) -> ChatRexConfig:
    """The configuration of a legacy folder: its ``config.json``'s fields (``raw``), type-checked and read as
    today's, given its weights' shapes."""
    check_field_types(ChatRexConfig, raw, config_path)
    try:
        migrated = migrate_config(raw, shapes)
    except BUILD_ERRORS as e:  # the heads' class counts come from the weights: a malformed head's shape
        raise ModelFolderError(f"{config_path}: the attribute heads of its weights: {one_line(e)}") from None
    return build_config(ChatRexConfig, migrated, config_path)


def load_legacy_model(folder: Path, config: ChatRexConfig | None = None) -> ChatRexForConditionalGeneration:
    """The model of a legacy folder (``config``: its configuration, when already read), every weight consumed
    (an unexpected or missing one is an error)."""
    weights = folder / "model.safetensors"
    if config is None:
        path = folder / "config.json"
        config = legacy_config(read_json_object(path), weight_shapes(weights), path)
    model = ChatRexForConditionalGeneration(config)
    state = {migrate_key(k): v for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelFolderError(f"{weights} does not fit its legacy configuration: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")  # fmt: skip
    return model.eval()
