"""The data engine's stages (ChatRex Sec. 4.1), each a step over a batch of images that fills in their items.

An item is one image's JSON-ready dict: ``id`` and ``image`` (its path) in; ``width``/``height`` (read),
``caption`` and ``caption_phrases`` (caption), ``phrases`` and ``dropped_phrases`` (phrases), ``regions``
(ground: phrase, span, box, score; describe: ``category``, ``short_phrase``, ``brief``, ``referring``; filter:
``dropped``, the rule that dropped the region, or None; rewrite: ``expression``; verify: ``expression_dropped``
and ``rejected_expression`` for an expression that failed its check) out, the stages in that order. A stage
that fails on an image sets its ``error`` ("stage: message") and later stages pass it by.

What does the work is swappable: a ``Captioner``, a ``PhraseExtractor``, a ``Grounder``, a ``RegionCaptioner``
and a ``Rewriter`` (``EngineParts``). The defaults run here: a perceive model (the shipped ChatRex by default)
captions, grounds over its UPN's proposals, and captions regions at ChatRex's four granularities; the phrases
come from the captioner's own grounded spans (else ``phrases.chunk``); the rewriter cleans the unique referring
sentence. The paper conditions its region captioner on the grounding phrase; ChatRex's region templates take
no phrase, so the default drops a region whose category caption disagrees with its phrase instead (filter).
"""

from __future__ import annotations

import hashlib
import re
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from perceive.boxes import pair_iou
from perceive.engine.phrases import Phrase, chunk, head_noun, is_abstract, singular

GRANULARITIES = {"category": "region_category", "short_phrase": "region_phrase", "brief": "region_brief",
                 "referring": "region_sentence"}  # fmt: skip
DROP_RULES = ("low_score", "duplicate", "inconsistent", "no_expression", "not_regrounded")


@dataclass
class EngineConfig:
    """What the default parts use and how strictly the filters keep regions."""

    model: str | None = None  # the perceive model folder of the default parts (None: the shipped checkpoints/tiny)
    caption_kind: str = "caption_brief"  # the captioner's ChatRex template: caption_brief or caption_detailed
    min_score: float = 0.3  # a grounding below this confidence is dropped (low_score)
    duplicate_iou: float = 0.9  # a region overlapping a better-scored kept one this much is dropped (duplicate)
    check_category: bool = True  # drop a region whose category caption is not the head noun of its phrase
    verify: bool = True  # ground each referring expression again: it must find its region's box alone
    # what a failed check drops: "expression" (the region keeps its box and other texts) or the whole "region"
    verify_drops: str = "expression"
    verify_iou: float = 0.5  # how well the regrounded box must match the region's
    max_phrases: int = 4  # phrases per grounding question
    batch_size: int = 8  # images per batch of every stage
    threads: int | None = None  # torch threads of each worker (None: torch's default)

    def __post_init__(self) -> None:
        if self.caption_kind not in ("caption_brief", "caption_detailed"):
            raise ValueError(f"caption_kind must be caption_brief or caption_detailed, got {self.caption_kind!r}")
        if self.verify_drops not in ("expression", "region"):
            raise ValueError(f"verify_drops must be 'expression' or 'region', got {self.verify_drops!r}")
        for name in ("min_score", "duplicate_iou", "verify_iou"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_phrases < 1 or self.batch_size < 1:
            raise ValueError(f"max_phrases and batch_size must be >= 1, got {self.max_phrases}, {self.batch_size}")


class Captioner(Protocol):
    def __call__(self, images: list[np.ndarray]) -> list[tuple[str, list[Phrase] | None]]:
        """Each image's caption and, when the captioner grounds it, the spans of its noun phrases."""
        ...


class PhraseExtractor(Protocol):
    def __call__(self, text: str) -> list[Phrase]: ...


@dataclass
class Grounding:
    phrase: int  # the index of the phrase in the question's list
    box: list[float]  # xyxy pixels
    score: float


class Grounder(Protocol):
    def __call__(self, images: list[np.ndarray], phrases: list[list[str]]) -> list[list[Grounding]]:
        """Each image's boxes for its phrases (any number per phrase, none when it is not there)."""
        ...


class RegionCaptioner(Protocol):
    def __call__(self, images: list[np.ndarray], regions: list[list[tuple[list[float], str]]]) -> list[list[dict]]:
        """Per image, per (box, phrase): ``{"category", "short_phrase", "brief", "referring"}`` texts."""
        ...


class Rewriter(Protocol):
    def __call__(self, region: dict) -> str | None:
        """A referring expression for a described region, or None."""
        ...


_IMAGES: OrderedDict[str, np.ndarray] = OrderedDict()  # the last images read: every stage of a batch reads them
_IMAGES_KEPT = 64


def image_of(item: dict) -> np.ndarray:
    from perceive.images import load_image

    path = item["image"]
    if path not in _IMAGES:
        _IMAGES[path] = load_image(path)
        while len(_IMAGES) > _IMAGES_KEPT:
            _IMAGES.popitem(last=False)
    _IMAGES.move_to_end(path)
    return _IMAGES[path]


# ---------------------------------------------------------------------------------------------- default parts


class ModelParts:
    """A perceive model loaded once, on first use, in whichever process uses it (a Ray worker loads its own)."""

    def __init__(self, model: str | None = None, threads: int | None = None) -> None:
        self.model, self.threads = model, threads
        self._perceiver: Any = None
        self._proposals: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __getstate__(self) -> dict:  # sent to a worker: the path, not the weights
        return {"model": self.model, "threads": self.threads, "_perceiver": None, "_proposals": OrderedDict()}

    def proposals(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's proposals (boxes, scores) for an image, computed once: grounding, describing and
        verifying all ask over the same ones."""
        key = (
            hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest() + str(image.shape).encode()
        )
        if key not in self._proposals:
            self._proposals[key] = self.perceiver.propose(image)
            while len(self._proposals) > _IMAGES_KEPT:
                self._proposals.popitem(last=False)
        self._proposals.move_to_end(key)
        return self._proposals[key]

    def encode(self, images: list[np.ndarray]) -> list:
        """The images encoded for questions over their proposals (``proposals``)."""
        found = [self.proposals(image) for image in images]
        return self.perceiver.encode_batch(images, [boxes for boxes, _ in found], [scores for _, scores in found])

    @property
    def perceiver(self):
        if self._perceiver is None:
            import torch

            import perceive

            if self.threads:
                torch.set_num_threads(self.threads)
            loaded = perceive.load(self.model)
            if not hasattr(loaded, "propose"):
                raise ValueError(f"the engine's default parts need a retrieval model with proposals (ChatRex); "
                                 f"{self.model} is a {loaded.model_type}")  # fmt: skip
            self._perceiver = loaded
        return self._perceiver


def context_boxes(proposals: np.ndarray, boxes: list[list[float]]) -> tuple[list[list[float]], list[int]]:
    """The proposals with each of ``boxes`` among them (a proposal it matches at IoU >= 0.95, else appended),
    and each box's index: a retrieval model describes a region best among the other objects it was trained with."""
    context = [list(map(float, b)) for b in proposals]
    where = []
    for box in boxes:
        best = max(range(len(context)), key=lambda k: pair_iou(context[k], box), default=None)
        if best is None or pair_iou(context[best], box) < 0.95:
            context.append(list(box))
            best = len(context) - 1
        where.append(best)
    return context, where


class ModelCaptioner:
    """The model's grounded caption (ChatRex's brief or detailed template); its grounded spans are the phrases."""

    def __init__(self, parts: ModelParts, kind: str = "caption_brief") -> None:
        self.parts, self.kind = parts, kind

    def __call__(self, images: list[np.ndarray]) -> list[tuple[str, list[Phrase] | None]]:
        from perceive.data.templates import CHATREX_TEMPLATES
        from perceive.formats import chatrex

        answers = self.parts.perceiver.answer(self.parts.encode(images), [CHATREX_TEMPLATES[self.kind]] * len(images))
        out: list[tuple[str, list[Phrase] | None]] = []
        for a in answers:
            parsed = chatrex.parse(a.text)
            out.append((parsed.text, [Phrase(g.phrase, g.span) for g in parsed.groups]))
        return out


def default_extractor(text: str, spans: list[Phrase] | None = None) -> list[Phrase]:
    return list(spans) if spans else chunk(text)


class ModelGrounder:
    """ChatRex's detection template over the model's proposals, ``max_phrases`` phrases a question; a box's
    score is its proposal's times the model's probability of choosing it."""

    def __init__(self, parts: ModelParts, max_phrases: int = 4) -> None:
        self.parts, self.max_phrases = parts, max_phrases

    def __call__(self, images: list[np.ndarray], phrases: list[list[str]]) -> list[list[Grounding]]:
        from perceive.data.templates import CHATREX_TEMPLATES, PHRASE_SEPARATOR

        perceiver = self.parts.perceiver
        encoded = self.parts.encode(images)
        asks, where = [], []
        for i, wanted in enumerate(phrases):
            for start in range(0, len(wanted), self.max_phrases):
                part = wanted[start : start + self.max_phrases]
                asks.append((encoded[i], CHATREX_TEMPLATES["detect"].format(obj=PHRASE_SEPARATOR.join(part))))
                where.append((i, start, part))
        out: list[list[Grounding]] = [[] for _ in images]
        if asks:
            answers = perceiver.answer([e for e, _ in asks], [q for _, q in asks])
            for (i, start, part), answer in zip(where, answers, strict=True):
                for o in answer.objects:
                    if o.phrase in part:
                        out[i].append(Grounding(start + part.index(o.phrase), list(o.box), float(o.score)))
        return out


class ModelRegionCaptioner:
    """ChatRex's four region-caption templates about ``<objK>``, the region among the model's proposals."""

    def __init__(self, parts: ModelParts) -> None:
        self.parts = parts

    def __call__(self, images: list[np.ndarray], regions: list[list[tuple[list[float], str]]]) -> list[list[dict]]:
        from perceive.data.templates import CHATREX_TEMPLATES
        from perceive.formats import chatrex

        perceiver = self.parts.perceiver
        asks, where = [], []
        for i, (image, rs) in enumerate(zip(images, regions, strict=True)):
            if not rs:
                continue
            proposals, _ = self.parts.proposals(image)
            boxes, index = context_boxes(proposals, [box for box, _ in rs])
            enc = perceiver.encode_batch([image], [boxes])[0]
            for r, k in enumerate(index):
                for name, template in GRANULARITIES.items():
                    asks.append((enc, CHATREX_TEMPLATES[template].format(obj=f"<obj{k}>")))
                    where.append((i, r, name))
        out: list[list[dict]] = [[{} for _ in rs] for rs in regions]
        if asks:
            answers = perceiver.answer([e for e, _ in asks], [q for _, q in asks])
            for (i, r, name), answer in zip(where, answers, strict=True):
                groups = chatrex.parse(answer.text).groups
                out[i][r][name] = (groups[0].phrase if groups else answer.plain).strip()
        return out


def default_rewriter(region: dict) -> str | None:
    """The unique referring sentence as an expression: its end punctuation off, its first letter lower-cased."""
    text = (region.get("referring") or "").strip().rstrip(".!?").strip()
    if not text:
        return None
    return text[0].lower() + text[1:]


@dataclass
class EngineParts:
    """The swappable parts; None: the default over ``EngineConfig.model``."""

    captioner: Captioner | None = None
    extractor: PhraseExtractor | None = None
    grounder: Grounder | None = None
    region_captioner: RegionCaptioner | None = None
    rewriter: Rewriter | None = None


# ---------------------------------------------------------------------------------------------- stages


class Stage(ABC):
    name = ""

    @abstractmethod
    def process(self, items: list[dict]) -> None:
        """Fill in ``items`` (every one without an ``error``); raise for a batch that cannot be done."""


def run_stage(stage: Stage, items: list[dict]) -> None:
    """``stage`` over the items without an error; when the batch fails, each image alone, so that one bad image
    records its error and the others go on. Each item's ``seconds[stage]`` is its share of the time."""
    todo = [it for it in items if "error" not in it]
    if not todo:
        return
    start = time.perf_counter()
    try:
        stage.process(todo)
    except Exception:
        for it in todo:
            try:
                stage.process([it])
            except Exception as e:  # one image's failure is recorded, not raised: the run goes on
                it["error"] = f"{stage.name}: {type(e).__name__}: {e}"
    share = (time.perf_counter() - start) / len(todo)
    for it in todo:
        it.setdefault("seconds", {})[stage.name] = round(share, 4)


class ReadStage(Stage):
    name = "read"

    def process(self, items: list[dict]) -> None:
        for it in items:
            h, w = image_of(it).shape[:2]
            it["width"], it["height"] = int(w), int(h)


class CaptionStage(Stage):
    name = "caption"

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner

    def process(self, items: list[dict]) -> None:
        results = self.captioner([image_of(it) for it in items])
        for it, (text, spans) in zip(items, results, strict=True):
            it["caption"], it["caption_kind"] = text, getattr(self.captioner, "kind", "caption_brief")
            it["caption_phrases"] = None if spans is None else [{"text": p.text, "span": list(p.span)} for p in spans]


class PhraseStage(Stage):
    """The caption's noun phrases, abstract ones dropped (``dropped_phrases``), each distinct phrase once."""

    name = "phrases"

    def __init__(self, extractor: PhraseExtractor | None) -> None:
        self.extractor = extractor

    def process(self, items: list[dict]) -> None:
        for it in items:
            spans = None if it.get("caption_phrases") is None else [
                Phrase(p["text"], tuple(p["span"])) for p in it["caption_phrases"]]  # fmt: skip
            found = self.extractor(it["caption"]) if self.extractor else default_extractor(it["caption"], spans)
            kept, dropped, seen = [], [], set()
            for p in found:
                key = p.text.strip().lower()
                if not key:
                    continue
                if is_abstract(p.text):
                    dropped.append({"text": p.text, "span": list(p.span), "rule": "abstract"})
                elif key in seen:
                    dropped.append({"text": p.text, "span": list(p.span), "rule": "repeated"})
                else:
                    seen.add(key)
                    kept.append({"text": p.text.strip(), "span": list(p.span)})
            it["phrases"], it["dropped_phrases"] = kept, dropped


class GroundStage(Stage):
    name = "ground"

    def __init__(self, grounder: Grounder) -> None:
        self.grounder = grounder

    def process(self, items: list[dict]) -> None:
        found = self.grounder([image_of(it) for it in items], [[p["text"] for p in it["phrases"]] for it in items])
        for it, groundings in zip(items, found, strict=True):
            it["regions"] = [{"phrase": it["phrases"][g.phrase]["text"], "span": it["phrases"][g.phrase]["span"],
                              "box": [round(float(v), 2) for v in g.box], "score": round(float(g.score), 4),
                              "dropped": None} for g in groundings]  # fmt: skip


class FilterStage(Stage):
    """Drops, in this order: low_score, duplicate (of a better-scored kept region), inconsistent (a category
    caption that is not its phrase's head noun: the paper's check that a region caption matches its phrase)."""

    name = "filter"

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    def process(self, items: list[dict]) -> None:
        c = self.config
        for it in items:
            kept: list[dict] = []
            for r in sorted(it["regions"], key=lambda r: -r["score"]):
                if r["score"] < c.min_score:
                    r["dropped"] = "low_score"
                elif any(pair_iou(r["box"], k["box"]) > c.duplicate_iou for k in kept):
                    r["dropped"] = "duplicate"
                elif c.check_category and not consistent(r.get("category", ""), r["phrase"]):
                    r["dropped"] = "inconsistent"
                else:
                    kept.append(r)


def consistent(category: str, phrase: str) -> bool:
    """Whether a category caption is the phrase's head noun or one of its words (singular)."""
    cat = head_noun(category)
    return bool(cat) and cat in {singular(w) for w in re.findall(r"[a-z][a-z'-]*", phrase.lower())}


class DescribeStage(Stage):
    """Region captions at the four granularities for the regions grounding found (before the filters: the
    category caption is what the consistency filter checks)."""

    name = "describe"

    def __init__(self, region_captioner: RegionCaptioner, config: EngineConfig) -> None:
        self.region_captioner, self.config = region_captioner, config

    def process(self, items: list[dict]) -> None:
        # a region below the score threshold is dropped anyway: it is not described
        wanted = [[r for r in it["regions"] if r["score"] >= self.config.min_score] for it in items]
        texts = self.region_captioner([image_of(it) for it in items],
                                      [[(r["box"], r["phrase"]) for r in rs] for rs in wanted])  # fmt: skip
        for rs, ts in zip(wanted, texts, strict=True):
            for r, t in zip(rs, ts, strict=True):
                r.update({name: str(t.get(name, "")) for name in GRANULARITIES})


class RewriteStage(Stage):
    name = "rewrite"

    def __init__(self, rewriter: Rewriter | None) -> None:
        self.rewriter = rewriter or default_rewriter

    def process(self, items: list[dict]) -> None:
        for it in items:
            for r in it["regions"]:
                if r["dropped"] is None:
                    r["expression"] = self.rewriter(r)
                    if not r["expression"]:
                        r["dropped"] = "no_expression"


class VerifyStage(Stage):
    """Grounds each referring expression again; one that does not find its region's box alone (one box, IoU >=
    ``verify_iou``) is dropped (not_regrounded): the expression (``expression_dropped``), or with ``verify_drops``
    "region" the whole region (``dropped``). A dropped expression stays in the results as ``rejected_expression``;
    the region's referring sentence is then not written out (``perceive.engine.output``)."""

    name = "verify"

    def __init__(self, grounder: Grounder, config: EngineConfig) -> None:
        self.grounder, self.config = grounder, config

    def process(self, items: list[dict]) -> None:
        asked = [[r for r in it["regions"] if r["dropped"] is None] for it in items]
        found = self.grounder([image_of(it) for it in items], [[r["expression"] for r in rs] for rs in asked])
        for rs, groundings in zip(asked, found, strict=True):
            for j, r in enumerate(rs):
                boxes = [g.box for g in groundings if g.phrase == j]
                if len(boxes) != 1 or pair_iou(boxes[0], r["box"]) < self.config.verify_iou:
                    if self.config.verify_drops == "region":
                        r["dropped"] = "not_regrounded"
                    else:
                        r["rejected_expression"], r["expression"] = r["expression"], None
                        r["expression_dropped"] = "not_regrounded"


def build_stages(config: EngineConfig, parts: EngineParts | None = None) -> list[Stage]:
    """The engine's stages in order, with ``parts`` where given and the defaults (one shared model) elsewhere."""
    parts = parts or EngineParts()
    model = ModelParts(config.model, config.threads)
    grounder = parts.grounder or ModelGrounder(model, config.max_phrases)
    stages: list[Stage] = [
        ReadStage(),
        CaptionStage(parts.captioner or ModelCaptioner(model, config.caption_kind)),
        PhraseStage(parts.extractor),
        GroundStage(grounder),
        DescribeStage(parts.region_captioner or ModelRegionCaptioner(model), config),
        FilterStage(config),
        RewriteStage(parts.rewriter),
    ]
    if config.verify:
        stages.append(VerifyStage(grounder, config))
    return stages
