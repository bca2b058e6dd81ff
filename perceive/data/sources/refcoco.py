"""RefCOCO, RefCOCO+ and RefCOCOg refs as a source of records (``format: "refcoco"``): the ``refs`` JSON, the COCO
``instances`` JSON its refs point into (the refer toolkit's ``instances.json``), the ``images`` folder, and
optionally the ``split`` whose refs to read ("train", "val", "testA", ...).

A record is an image with refs: its instances are every annotation of the image (``perceive.data.sources.coco``),
and each sentence of each ref is an ``Expression`` answered by the ref's annotation. A ref answered by one
annotation also gives that annotation a region text (its first sentence, for region-referring questions). The
records ask nothing else: no counting, no region categories, no absent categories. gRefCOCO's refs are read too:
``ann_id`` a list (several targets) and ``no_target`` (none: the expression is a rejection, domain
"rejection"; gRefCOCO writes ``[-1]`` for its ``ann_id``).

The toolkit ships its refs as pickles (``refs(unc).p``), which are never loaded here (unpickling runs code).
Convert one once, in the refer toolkit's own environment, where you trust the file::

    import json, pickle

    with open("refcoco/refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    with open("refcoco/refs(unc).json", "w") as f:
        json.dump(refs, f)
"""

from __future__ import annotations

from pathlib import Path

from perceive.data.readers import FormatError
from perceive.data.records import Expression, ImageRecord, RegionText
from perceive.data.sources import PackedRows, Source, load_json_file, skip
from perceive.data.sources.coco import CocoSource

REFS_EXPECTED = "RefCOCO refs as JSON (a list of refs with ref_id, ann_id, image_id and sentences)"
PICKLE_SUFFIXES = (".p", ".pkl", ".pickle")


class RefcocoSource(Source):
    """The images that refs of ``split`` (every split: None) are about, one record each."""

    name = "refcoco"
    kinds: tuple[str, ...] | None = None  # RefCOCO does not sort its expressions into kinds

    def __init__(
        self,
        refs: str | Path,
        instances: str | Path,
        images: str | Path,
        split: str | None = None,
        strict: bool = False,
    ) -> None:
        self.path = Path(refs)
        self.split = split
        self.strict = strict
        if self.path.suffix.lower() in PICKLE_SUFFIXES or _starts_as_pickle(self.path):
            raise FormatError(f"{self.path}: a pickle, which is never loaded (unpickling runs code); convert it "
                              f"to JSON in the refer toolkit's environment (perceive/data/sources/refcoco.py "
                              f"says how)")  # fmt: skip
        data = load_json_file(self.path, REFS_EXPECTED)
        first = data[0] if isinstance(data, list) and data else None
        if not isinstance(data, list) or (isinstance(first, dict) and "sentences" not in first):
            what = " (it is a COCO JSON: give it as 'instances')" if isinstance(data, dict) and "images" in data else ""
            raise FormatError(f"{self.path}: not {REFS_EXPECTED}{what}")
        self.instances = CocoSource(instances, images, strict)
        self.skipped = self.instances.skipped  # one account of the source: its refs and the annotations under them
        self.schema = self.instances.schema
        self._rows = PackedRows(self._read_refs(data))

    def _skip(self, reason: str, where: str) -> None:
        skip(self.skipped, self.strict, reason, where)

    def _read_refs(self, refs: list) -> list[list]:
        """A row ``[instances' record index, [[answer ann ids, sentences], ...]]`` per image with usable refs."""
        by_image: dict[int, list[tuple[str, list[int], list[str]]]] = {}
        splits = set()
        for k, ref in enumerate(refs):
            where = f"{self.path}: refs[{k}] (ref_id {ref.get('ref_id')!r})" if isinstance(ref, dict) else ""
            if not isinstance(ref, dict):
                self._skip("malformed ref", f"{self.path}: refs[{k}]")
                continue
            if isinstance(ref.get("split"), str):
                splits.add(ref["split"])
            if self.split is not None and ref.get("split") != self.split:
                continue
            image_id = ref.get("image_id")
            index = self.instances.image_index.get(image_id) if isinstance(image_id, (int, str)) else None
            if index is None:
                if image_id not in self.instances.lost_images:  # else its image is counted already
                    self._skip("unknown image", f"{where}: image_id {image_id!r}")
                continue
            targets = ref.get("ann_id")
            targets = [targets] if isinstance(targets, int) else targets
            sentences = ref.get("sentences")
            if not isinstance(targets, list) or not all(isinstance(a, int) for a in targets):
                self._skip("malformed ref", f"{where}: ann_id {ref.get('ann_id')!r}")
                continue
            said = [s.get("sent") or s.get("raw") for s in sentences if isinstance(s, dict)] if isinstance(
                sentences, list) else []  # fmt: skip
            texts = [t.strip() for t in said if isinstance(t, str) and t.strip()]
            if not texts:
                self._skip("ref without sentences", where)
                continue
            answers = [] if ref.get("no_target") else [a for a in targets if a != -1]
            by_image.setdefault(index, []).append((where, answers, texts))
        if self.split is not None and self.split not in splits:
            raise FormatError(f"{self.path}: no refs of split {self.split!r}; its splits are {sorted(splits)}")
        rows = []
        for index, image_refs in by_image.items():
            anns = {a[0]: bool(a[3]) for a in self.instances.row(index)[4]}  # annotation id -> iscrowd
            kept = []
            for where, answers, texts in image_refs:
                if not all(a in anns for a in answers):
                    self._skip("ref naming an unknown annotation", f"{where}: ann_id {answers}")
                elif any(anns[a] for a in answers):
                    self._skip("ref answered by a crowd region", where)
                else:
                    kept.append([answers, texts])
            if kept:
                rows.append([index, kept])
        return rows

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, index: int) -> ImageRecord:
        image, refs = self._rows[index]
        record = self.instances.record(image)
        record.expressions = [Expression(text, list(answers), "" if answers else "rejection")
                              for answers, texts in refs for text in texts]  # fmt: skip
        first_sentence: dict[int, str] = {}
        for answers, texts in refs:
            if len(answers) == 1:
                first_sentence.setdefault(answers[0], texts[0])
        record.regions = [RegionText(ann, referring=text) for ann, text in first_sentence.items()]
        record.questions, record.negative_categories = [], []
        return record


def _starts_as_pickle(path: Path) -> bool:
    """Whether ``path`` begins with a pickle's protocol opcode (a pickle renamed ``.json``)."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x80"
    except OSError:
        return False
