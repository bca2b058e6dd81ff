"""Where records come from: the synthetic world (``world``) and the field's annotation files (a module per
format). A source is a sequence of ``ImageRecord``s with an ``AttributeSchema`` (what it labels on its
instances); ``perceive.data.spec`` reads a data spec into sources with weights."""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perceive.data.records import AttributeSchema, ImageRecord, Question


@dataclass
class Skipped:
    """What a reader skipped: a count per reason and the first few places (file, line or id), for the summary
    a run prints at start-up."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "nothing skipped"
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        return f"skipped {self.total} ({reasons}); e.g. {'; '.join(self.examples[:3])}"


class Source(ABC):
    """A sequence of image records."""

    name: str = ""
    schema: AttributeSchema
    skipped: Skipped

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def record(self, index: int) -> ImageRecord:
        """Record ``index`` (0 <= index < len(self))."""


def count_questions(record: ImageRecord) -> list[Question]:
    """A counting question for each category present in ``record``, answered by its instances (crowds
    aside): what a source without its own counting questions (COCO, LVIS) can ask."""
    by_category: dict[str, list[int]] = {}
    for inst in record.instances:
        if not inst.iscrowd:
            by_category.setdefault(inst.category, []).append(inst.id)
    return [Question("count", f"How many {name} are there?", str(len(ids)), answer_objects=ids)
            for name, ids in sorted(by_category.items())]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# helpers of the file readers
# ---------------------------------------------------------------------------------------------


def skip(skipped: Skipped, strict: bool, reason: str, where: str) -> None:
    """Count what a reader leaves out (``where``: file and line or id), or with ``strict`` stop there."""
    if strict:
        from perceive.data.readers import FormatError

        raise FormatError(f"{where}: {reason}")
    skipped.add(reason, where)


def coco_categories(
    categories: list, where: str, skip_entry: Callable[[str, str], None]
) -> dict[int, tuple[str, dict]]:
    """Category id -> (name, entry) of a COCO ``categories`` list (``where``: the file); an empty list, and each
    entry without an int id and a non-empty name or with an id seen before, is left out through ``skip_entry``."""
    out: dict[int, tuple[str, dict]] = {}
    if not categories:
        skip_entry("empty category list", f"{where}: categories")
    for k, c in enumerate(categories):
        cid = c.get("id") if isinstance(c, dict) else None
        name = c.get("name") if isinstance(c, dict) else None
        if not isinstance(cid, int) or not isinstance(name, str) or not name.strip() or cid in out:
            skip_entry("malformed category", f"{where}: categories[{k}]")
            continue
        out[cid] = (name.strip(), c)
    return out


def json_lines(path: Path, skip_line: Callable[[str, str], None]) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of a JSON Lines file (``where``: "FILE:LINE"); a line that is
    not JSON is left out through ``skip_line(reason, where)``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                skip_line("malformed line", f"{where}: not JSON")
                continue
            yield where, value


class PackedRows:
    """JSON values kept as one bytes buffer and decoded one at a time: what a reader indexes at load time for
    ``record(i)`` to build from, in a tenth of the memory of the parsed objects, and shared without copying by
    the DataLoader workers forked from the loading process (a buffer has no per-object reference counts for
    a worker to write to)."""

    def __init__(self, rows: Iterable[object]) -> None:
        chunks: list[bytes] = []
        ends = [0]
        for row in rows:
            chunks.append(json.dumps(row, separators=(",", ":")).encode())
            ends.append(ends[-1] + len(chunks[-1]))
        self._data = b"".join(chunks)
        self._ends = np.asarray(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {len(self)}")
        return json.loads(self._data[self._ends[index] : self._ends[index + 1]])


def load_json_file(path: Path, expected: str) -> Any:
    """The JSON value in ``path``, or a one-line ``FormatError`` naming the file and ``expected`` (what the
    format wants) when it is missing, not JSON, or JSON Lines."""
    from perceive.data.readers import FormatError

    if not path.is_file():
        raise FormatError(f"{path}: no such file (expected {expected})")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a text file (expected {expected})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # one JSON value a line
            raise FormatError(f"{path}: a JSON Lines file, not {expected}") from None
        raise FormatError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); expected {expected}") from None


def first_line(path: Path, expected: str, fields: tuple[str, ...]) -> None:
    """Check that a JSON Lines file is of the kind its format wants: a one-line ``FormatError`` naming the file and
    ``expected`` when it is missing, is one JSON document, or its first object has none of ``fields``."""
    from perceive.data.readers import FormatError

    if not path.is_file():
        raise FormatError(f"{path}: no such file (expected {expected})")
    with open(path, "rb") as f:
        lines = (raw for raw in f if raw.strip())
        line, more = next(lines, b""), next(lines, None) is not None
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{path}: not a text file (expected {expected})") from None
    try:
        first = json.loads(text) if text else {}
    except json.JSONDecodeError:
        try:
            load_json_file(path, expected)
        except FormatError:
            return  # not one JSON document either: a malformed first line, skipped and counted where it is read
        raise FormatError(f"{path}: one JSON document, not JSON Lines; expected {expected}") from None
    if not isinstance(first, dict) or (first and not any(k in first for k in fields)):
        if not more:  # a file of one compact JSON document
            raise FormatError(f"{path}: one JSON document, not JSON Lines; expected {expected}")
        raise FormatError(f"{path}: its first line is not {expected}")


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as ``perceive.images.load_image`` turns it (EXIF orientation applied),
    read from its header alone; ``ImageError`` when the file is not a readable image."""
    import warnings

    from PIL import Image

    from perceive.images import FORMATS, ImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused when decoded, not here
            with Image.open(path, formats=FORMATS) as im:
                width, height = im.size
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF orientations that swap the sides
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: not a readable image ({e})") from None
    return (height, width) if turned else (width, height)


def clip_box(box: list[float], width: int, height: int) -> tuple[list[float] | None, str]:
    """``box`` clipped to the image, or None and why it is unusable: "box with x1 < x0 or y1 < y0", "box outside
    the image" (no overlap), "empty box" (no area)."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return None, "box with x1 < x0 or y1 < y0"
    if x0 >= width or y0 >= height or x1 <= 0 or y1 <= 0:
        return None, "box outside the image"
    clipped = [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
        return None, "empty box"
    return clipped, ""


def _numbers(value: list) -> bool:
    """Whether every item of ``value`` is a finite number (JSON's ints and floats; bools are not numbers)."""
    # map and set run in C: a COCO file has millions of polygon coordinates to check
    return set(map(type, value)) <= {int, float} and math.isfinite(sum(value))


def finite_numbers(value: object, n: int | None = None) -> list[float] | None:
    """``value`` as a list of finite floats (of length ``n`` when given), or None."""
    if not isinstance(value, list) or (n is not None and len(value) != n) or not _numbers(value):
        return None
    return list(map(float, value))


def valid_mask(mask: object, width: int, height: int) -> bool:
    """Whether ``mask`` is a COCO mask of a ``width`` x ``height`` image: RLE (``counts`` a string, or a list of
    run lengths that sum to the pixels) of that size, or polygons (lists of at least three x, y pairs)."""
    if isinstance(mask, dict):
        size, counts = mask.get("size"), mask.get("counts")
        if size != [height, width]:
            return False
        if isinstance(counts, list):
            return set(map(type, counts)) <= {int} and min(counts, default=0) >= 0 and sum(counts) == width * height
        return isinstance(counts, str) and bool(counts)
    if isinstance(mask, list) and mask:
        return all(isinstance(ring, list) and len(ring) >= 6 and len(ring) % 2 == 0 and _numbers(ring) for ring in mask)
    return False
