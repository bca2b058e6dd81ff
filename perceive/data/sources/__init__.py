"""Where records come from: the synthetic world (``world``) and the field's annotation files (a module per
format). A source is a sequence of ``ImageRecord``s with an ``AttributeSchema`` (what it labels on its
instances); ``perceive.data.spec`` reads a data spec into sources with weights."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

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
