"""The UPN's proposals for every image of a file dataset, computed once after the UPN is trained and kept
beside the run (``proposals.safetensors``), so training batches read them instead of running the UPN on
each batch's images again, and DataLoader workers need no model.

A record's proposals are keyed by its source's position in the data spec and its key; the file says which
UPN made it (the hash of its weights), and a file made by another UPN is made again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from perceive.data.records import ImageRecord
from perceive.images import ImageError

UPN_KEY = "__upn__"


def upn_fingerprint(upn) -> np.ndarray:
    """A short hash of the UPN's weights, as bytes: the proposals of another UPN are other proposals."""
    digest = hashlib.sha256()
    for name, tensor in sorted(upn.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return np.frombuffer(digest.digest()[:16], dtype=np.uint8).copy()


def proposal_key(record: ImageRecord) -> str:
    return f"{record.source}/{record.key}"


class ProposalCache:
    """Proposals by record (``get``), for ``TaskStream(proposals=...)``."""

    def __init__(self, boxes: dict[str, np.ndarray]) -> None:
        self.boxes = boxes

    def get(self, record: ImageRecord) -> np.ndarray | None:
        return self.boxes.get(proposal_key(record))


def build(
    upn,
    records: Iterable[ImageRecord],
    path: Path,
    total: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> ProposalCache:
    """The proposals of every record (``record.source`` set): read from ``path`` when the same UPN made it, else
    computed in batches and written there atomically. An image that cannot be read gets none (its record is
    trained with its true boxes only)."""
    from tqdm import tqdm

    from perceive.train.data import propose

    fingerprint = upn_fingerprint(upn)
    if path.is_file():
        saved = load_file(str(path))
        if np.array_equal(saved.pop(UPN_KEY, np.zeros(0, np.uint8)), fingerprint):
            return ProposalCache(saved)
    boxes: dict[str, np.ndarray] = {}
    bar = tqdm(total=total, desc="proposals", unit="image", disable=not progress)
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if pending:
            for (key, _), found in zip(pending, propose(upn, [im for _, im in pending]), strict=True):
                boxes[key] = found
            bar.update(len(pending))
            pending.clear()

    with torch.no_grad():
        for record in records:
            try:
                image = record.image()
            except (ImageError, OSError, ValueError):
                bar.update(1)
                continue
            pending.append((proposal_key(record), image))
            if len(pending) == batch_size:
                flush()
        flush()
    bar.close()
    tmp = path.with_name(f".tmp_{path.name}")
    save_file({**boxes, UPN_KEY: fingerprint}, str(tmp))
    tmp.replace(path)
    return ProposalCache(boxes)
