"""Data specs: which annotation files a model trains or is benchmarked on, each a source of records
(``perceive.data.sources``) with a weight.

A spec is a world export folder (``perceive world generate``: it has ``world.json``), or a JSON or YAML file (YAML
needs PyYAML, which ``transformers`` already installs) listing sources, paths relative to the file::

    {"sources": [
      {"format": "coco", "annotations": "instances.json", "images": "images/", "weight": 1},
      {"format": "lvis", "annotations": "lvis_v1_train.json", "images": "coco/"},
      {"format": "panoptic", "annotations": "panoptic.json", "masks": "panoptic/", "images": "images/"},
      {"format": "refcoco", "refs": "refs.json", "instances": "instances.json", "images": "images/", "split": "train"},
      {"format": "humanref", "annotations": "humanref.jsonl", "images": "images/"},
      {"format": "jsonl", "annotations": "mine.jsonl", "images": "photos/", "exhaustive": true},
      {"format": "world", "path": "world/"}
    ]}

``weight`` (default 1) is how often a source is drawn relative to the others; ``split`` (refcoco only) the refs'
split to read; ``images`` (jsonl only) defaults to the JSONL's folder and ``exhaustive`` (jsonl only, default
true) says whether the file labels every object of its categories. Each format's reader says what it reads
(``perceive.data.sources.coco``, ``.panoptic``, ``.refcoco``, ``.humanref``, ``.jsonl``, ``.world_folder``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perceive.data.readers import FormatError
from perceive.data.records import AttributeSchema, ImageRecord
from perceive.data.sources import Source
from perceive.data.tasks import TASKS, feeds

# format -> (the paths it needs, the other keys it takes); every source may also have "format" and "weight"
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "coco": (("annotations", "images"), ()),
    "lvis": (("annotations", "images"), ()),
    "panoptic": (("annotations", "masks", "images"), ()),
    "refcoco": (("refs", "instances", "images"), ("split",)),
    "humanref": (("annotations", "images"), ()),
    "jsonl": (("annotations",), ("images", "exhaustive")),
    "world": (("path",), ()),
}
SUMMARY_SAMPLE = 200  # records a source's summary reads to say which tasks it feeds
MAX_DRAWS = 50  # draws of a record that feeds a task before ``MixedRecords`` walks the source for one


@dataclass
class DataSpec:
    sources: list[Source]
    weights: list[float]

    def schema(self) -> AttributeSchema:
        """What the sources label, merged: each attribute's values in the order first seen across the sources."""
        values: dict[str, dict[str, None]] = {}
        grid: dict[str, None] = {}
        for source in self.sources:
            for name, vs in source.schema.values.items():
                values.setdefault(name, {}).update(dict.fromkeys(vs))
            grid.update(dict.fromkeys(source.schema.grid))
        if "category" in values:  # category first, as every schema has it
            values = {"category": values.pop("category"), **values}
        return AttributeSchema({n: list(vs) for n, vs in values.items()}, list(grid))

    def kinds(self) -> tuple[str, ...] | None:
        """The kinds of expression (``"domain/sub_domain"``) of the sources that say which they have; None if
        none says."""
        said = [k for k in (getattr(s, "kinds", None) for s in self.sources) if k is not None]
        return tuple(dict.fromkeys(kind for kinds in said for kind in kinds)) if said else None

    def summary(self) -> str:
        """A line per source: its format, file, records, the tasks it feeds (read off a sample of its records)
        and what its reader skipped."""
        lines = []
        for k, (source, weight) in enumerate(zip(self.sources, self.weights, strict=True)):
            n = len(source)
            sample = sorted({i * n // SUMMARY_SAMPLE for i in range(min(n, SUMMARY_SAMPLE))})
            fed = {task for i in sample for task in feeds(source.record(i))}
            tasks = ", ".join(t for t in TASKS if t in fed) or "no task"
            lines.append(f"source {k}: {source.name} {getattr(source, 'path', '')} (weight {weight:g}): {n} records; "
                         f"feeds {tasks}; {source.skipped.summary()}")  # fmt: skip
        return "\n".join(lines)


def load_spec(path: str | Path, strict: bool = False) -> DataSpec:
    """The sources of the spec at ``path`` (a world export folder, or a JSON or YAML file); ``strict`` stops at the
    first bad record instead of skipping it. A spec that is not one gets a one-line ``FormatError`` naming the
    file and the source."""
    from perceive.data.sources.world_folder import WorldFolderSource

    spec = Path(path)
    if spec.is_dir():
        if not (spec / "world.json").is_file():
            raise FormatError(f"{spec}: a folder that is not a world export (it has no world.json); a data spec is "
                              f"a world export folder or a JSON or YAML file")  # fmt: skip
        return DataSpec([WorldFolderSource(spec, strict)], [1.0])
    data = _read_spec_file(spec)
    entries = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise FormatError(f"{spec}: a data spec is an object with a non-empty list of 'sources'")
    sources, weights = [], []
    for k, entry in enumerate(entries):
        source, weight = _source(spec, k, entry, strict)
        sources.append(source)
        weights.append(weight)
    return DataSpec(sources, weights)


def _read_spec_file(spec: Path) -> object:
    if not spec.is_file():
        raise FormatError(f"{spec}: no such data spec (a world export folder, or a JSON or YAML file)")
    if spec.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise FormatError(f"{spec}: a YAML spec needs PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            return yaml.safe_load(spec.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise FormatError(f"{spec}: not valid YAML ({' '.join(str(e).split())})") from None
    from perceive.data.sources import load_json_file

    return load_json_file(spec, "a data spec (an object with a list of sources)")


def _source(spec: Path, k: int, entry: object, strict: bool) -> tuple[Source, float]:
    """Source ``k`` of the spec file ``spec`` and its weight."""
    from perceive.data.sources.coco import CocoSource, LvisSource
    from perceive.data.sources.humanref import HumanRefSource
    from perceive.data.sources.jsonl import JsonlSource
    from perceive.data.sources.panoptic import PanopticSource
    from perceive.data.sources.refcoco import RefcocoSource
    from perceive.data.sources.world_folder import WorldFolderSource

    where = f"{spec}: sources[{k}]"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: a source is an object with a format and its paths")
    fmt = entry.get("format")
    if fmt not in FORMATS:
        raise FormatError(f"{where}: unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    needed, optional = FORMATS[fmt]
    missing = [key for key in needed if not isinstance(entry.get(key), str) or not entry[key]]
    if missing:
        raise FormatError(f"{where} ({fmt}): missing {', '.join(missing)} (a path relative to the spec)")
    unknown = sorted(set(entry) - {"format", "weight", *needed, *optional})
    if unknown:
        raise FormatError(f"{where} ({fmt}): unknown keys {unknown}; a {fmt} source takes "
                          f"{', '.join([*needed, *optional, 'weight'])}")  # fmt: skip
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise FormatError(f"{where} ({fmt}): weight must be a positive number, got {weight!r}")
    for key, kind in (("split", str), ("images", str), ("exhaustive", bool)):
        if key in entry and not isinstance(entry[key], kind):
            raise FormatError(f"{where} ({fmt}): {key} must be a {kind.__name__}, got {entry[key]!r}")
    base = spec.parent

    def at(key: str) -> Path:
        return base / entry[key]

    source: Source
    if fmt == "coco":
        source = CocoSource(at("annotations"), at("images"), strict)
    elif fmt == "lvis":
        source = LvisSource(at("annotations"), at("images"), strict)
    elif fmt == "panoptic":
        source = PanopticSource(at("annotations"), at("masks"), at("images"), strict)
    elif fmt == "refcoco":
        source = RefcocoSource(at("refs"), at("instances"), at("images"), entry.get("split"), strict)
    elif fmt == "humanref":
        source = HumanRefSource(at("annotations"), at("images"), strict)
    elif fmt == "jsonl":
        images = at("images") if "images" in entry else None
        source = JsonlSource(at("annotations"), images, entry.get("exhaustive", True), strict)
    else:
        source = WorldFolderSource(at("path"), strict)
    return source, float(weight)


class MixedRecords:
    """The records of a data spec as a stream (``perceive.train.data.RecordStream``): image ``index`` of seed
    ``seed`` is drawn from a source chosen by weight, then a record of that source chosen uniformly among those
    that feed at least one task (``perceive.data.tasks.feeds``). Which records feed a task is found lazily: a
    record drawn that feeds none is drawn again (up to ``MAX_DRAWS`` times, then the source is walked on from
    there), and the answer is kept so it is read once per process. Every draw is a function of ``(seed,
    index)``, so a resumed run and every DataLoader worker see the same record. Each record says which source it
    came from (``record.source``: its position in the spec)."""

    def __init__(self, spec: DataSpec) -> None:
        if len(spec.weights) != len(spec.sources) or not all(w > 0 for w in spec.weights):
            raise ValueError(f"a positive weight per source is needed; got {spec.weights} for {len(spec.sources)}")
        for k, source in enumerate(spec.sources):
            if not len(source):
                raise ValueError(f"source {k} ({source.name} {getattr(source, 'path', '')}) has no records: "
                                 f"{source.skipped.summary()}")  # fmt: skip
        self.spec = spec
        self.schema = spec.schema()
        self.kinds = spec.kinds()
        # per source and record: 0 not read yet, 1 feeds a task, -1 feeds none
        self._feeds = [np.zeros(len(s), dtype=np.int8) for s in spec.sources]

    def _feeding(self, k: int, i: int) -> ImageRecord | None:
        if self._feeds[k][i] < 0:
            return None
        record = self.spec.sources[k].record(i)
        self._feeds[k][i] = 1 if feeds(record) else -1
        return record if self._feeds[k][i] > 0 else None

    def record_for(self, seed: int, index: int) -> ImageRecord:
        rng = random.Random(f"mixed/{seed}/{index}")
        k = rng.choices(range(len(self.spec.sources)), self.spec.weights)[0]
        n = len(self.spec.sources[k])
        i = rng.randrange(n)
        record = self._feeding(k, i)
        for _ in range(MAX_DRAWS):
            if record is not None:
                break
            i = rng.randrange(n)
            record = self._feeding(k, i)
        for step in range(n if record is None else 0):  # few records feed a task: the next one that does
            record = self._feeding(k, (i + step) % n)
            if record is not None:
                break
        if record is None:
            source = self.spec.sources[k]
            raise ValueError(f"source {k} ({source.name} {getattr(source, 'path', '')}) has no record that feeds "
                             f"any task")  # fmt: skip
        record.source = k
        return record
