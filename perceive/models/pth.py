"""PyTorch ``.pth`` checkpoints (released UPN weights, say) read without running their pickles, and written
once as safetensors (``perceive convert``).

A ``.pth`` file is a pickle, and a pickle can run any code while it loads. It is read only with
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses everything else;
a file that needs more is refused with what it asked for. One class more is allowed: ``argparse.Namespace``, in
which DETR-family training scripts save their arguments beside the weights; rebuilding one only sets attributes.
The weights are the file's dict of tensors, or the one under ``model``, ``state_dict`` or ``module`` (how
training scripts wrap them; the wrapper's other entries, an epoch, the arguments or an optimizer's state, are
left out).
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from pathlib import Path

import torch

from perceive.models.folder_checks import one_line
from perceive.perceiver import ModelFolderError

WRAPPERS = ("model", "state_dict", "module")


def _tensors(value: object) -> dict[str, torch.Tensor] | None:
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in value.items()):  # fmt: skip
        return value
    return None


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a ``.pth`` file, read with ``weights_only=True``; a ``ModelFolderError`` naming the file
    when it is no such file or holds no dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(f"{path}: refused: unpickling it needs more than tensors and plain containers "
                               f"({one_line(e, 160)}); perceive never runs a checkpoint's code") from None  # fmt: skip
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise ModelFolderError(f"{path} is not a readable PyTorch checkpoint: {one_line(e, 160)}") from None
    weights = _tensors(loaded)
    if weights is None and isinstance(loaded, dict):
        weights = next((w for key in WRAPPERS if (w := _tensors(loaded.get(key))) is not None), None)
    if weights is None:
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, dict) else type(loaded).__name__
        raise ModelFolderError(f"{path} holds no dict of tensors (found: {keys}); expected the weights at the top "
                               f"level or under {', '.join(WRAPPERS)}")  # fmt: skip
    return weights


def convert(source: str | Path, target: str | Path) -> tuple[int, int]:
    """Write the weights of ``source`` (``.pth``) to ``target`` (safetensors, written whole or not at all);
    returns (tensors, bytes)."""
    from safetensors.torch import save_file

    weights = read_pth(source)
    # tensors that share storage (tied weights) are saved as copies: safetensors stores each tensor apart
    out = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt", "converted_from": Path(source).name})
    tmp.replace(target)
    return len(out), sum(v.numel() * v.element_size() for v in out.values())
