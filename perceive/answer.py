"""The answer every perceive model returns: the text, its grounded objects, and exports.

An :class:`Answer` holds the model's text (markup included), the objects it grounded (a phrase, an
``xyxy`` box in the input image's pixels, a confidence, and optionally the proposal index it was
chosen from, a COCO RLE mask and COCO person keypoints), the proposals a retrieval model chose
from, and any problems met while parsing. It exports to the JSON of ``perceive ask --json``, to COCO
results (``bbox``, ``segm`` and ``keypoints`` evaluation with pycocotools), to a picture, and to
``supervision.Detections`` / ``supervision.KeyPoints``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from perceive.keypoints import COCO_PERSON_KEYPOINTS

if TYPE_CHECKING:
    from PIL import Image

_SUPERVISION_MISSING = (
    "Answer.to_supervision needs the optional package supervision: pip install 'perceive[supervision]'"
)


def _import_supervision() -> Any:
    try:
        import supervision
    except ImportError as e:
        raise ImportError(_SUPERVISION_MISSING) from e
    return supervision


def _json_rle(rle: dict) -> dict:
    """``{"size": [h, w], "counts": str}``: a compressed RLE with bytes counts becomes JSON-safe."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    elif not isinstance(counts, str):  # uncompressed RLE: a list of run lengths
        counts = [int(c) for c in counts]
    return {"size": [int(v) for v in rle["size"]], "counts": counts}


@dataclass
class GroundedObject:
    """One grounded object of an answer."""

    phrase: str
    box: list[float]  # xyxy pixels of the input image
    score: float
    index: int | None = None  # the input box it was chosen from (retrieval models: <objK>); None for decoders
    mask: dict | None = None  # COCO RLE {"size": [h, w], "counts": str} at the input image's size
    keypoints: list[list[float]] | None = None  # 17 x [x, y, v], COCO person order (v: 0 absent, 1 occluded, 2 visible)

    def __post_init__(self) -> None:
        if len(self.box) != 4:
            raise ValueError(f"box must be xyxy (4 numbers), got {len(self.box)}")
        if self.keypoints is not None:
            n = len(COCO_PERSON_KEYPOINTS)
            if len(self.keypoints) != n or any(len(k) != 3 for k in self.keypoints):
                raise ValueError(f"keypoints must be {n} [x, y, v] triples in COCO's person order")

    def to_json(self) -> dict:
        out: dict[str, Any] = {"phrase": self.phrase}
        if self.index is not None:
            out["index"] = int(self.index)
        out["box"] = [round(float(v), 2) for v in self.box]
        out["score"] = round(float(self.score), 4)
        if self.mask is not None:
            out["mask"] = _json_rle(self.mask)
        if self.keypoints is not None:
            out["keypoints"] = [[round(float(x), 2), round(float(y), 2), int(v)] for x, y, v in self.keypoints]
        return out

    @classmethod
    def from_json(cls, d: dict) -> GroundedObject:
        """The inverse of :meth:`to_json` (up to its rounding)."""
        kps = d.get("keypoints")
        return cls(
            phrase=d["phrase"],
            box=[float(v) for v in d["box"]],
            score=float(d["score"]),
            index=d.get("index"),
            mask=d.get("mask"),
            keypoints=None if kps is None else [[float(x), float(y), int(v)] for x, y, v in kps],
        )


@dataclass
class Answer:
    """A model's answer to one question about one image."""

    text: str  # the model's answer, markup included
    objects: list[GroundedObject]
    proposals: list[dict] = field(default_factory=list)  # {"box": xyxy, "score": float}; retrieval: index k is <objk>
    problems: list[str] = field(default_factory=list)
    plain: str = ""  # the answer without markup (each model's parser fills it)

    def to_json(self) -> dict:
        """The documented JSON of ``perceive ask --json`` (``plain`` is not part of it)."""
        out: dict[str, Any] = {
            "answer": self.text,
            "objects": [o.to_json() for o in self.objects],
            "proposals": [
                {"box": [round(float(v), 2) for v in p["box"]], "score": round(float(p["score"]), 4)}
                for p in self.proposals
            ],
        }
        if self.problems:
            out["problems"] = list(self.problems)
        return out

    @classmethod
    def from_json(cls, d: dict, plain: str = "") -> Answer:
        """The inverse of :meth:`to_json` (up to its rounding); ``plain`` is not stored there."""
        return cls(
            text=d["answer"],
            objects=[GroundedObject.from_json(o) for o in d["objects"]],
            proposals=[{"box": [float(v) for v in p["box"]], "score": float(p["score"])} for p in d["proposals"]],
            problems=list(d.get("problems", [])),
            plain=plain,
        )

    def to_coco(self, image_id: int, category_ids: dict[str, int]) -> list[dict]:
        """COCO results of the objects whose phrase names a category in ``category_ids``.

        Each result has ``image_id``, ``category_id``, ``bbox`` (``[x, y, w, h]``) and ``score``, plus
        ``segmentation`` (the RLE) for an object with a mask and ``keypoints`` (51 numbers
        ``[x1, y1, v1, ...]``) for one with keypoints: pycocotools' results format, loadable with
        ``COCO.loadRes`` and evaluated by ``COCOeval`` with iouType "bbox", "segm" or "keypoints".
        """
        res = []
        for o in self.objects:
            if o.phrase not in category_ids:
                continue
            x0, y0, x1, y1 = (float(v) for v in o.box)
            r: dict[str, Any] = {"image_id": image_id, "category_id": category_ids[o.phrase],
                                 "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(o.score)}  # fmt: skip
            if o.mask is not None:
                r["segmentation"] = _json_rle(o.mask)
            if o.keypoints is not None:
                r["keypoints"] = [n for x, y, v in o.keypoints for n in (float(x), float(y), int(v))]
            res.append(r)
        return res

    def draw(self, image: np.ndarray, show_proposals: bool = False) -> Image.Image:
        """A picture of the answer: boxes, masks and skeletons in each phrase's colour (proposals in grey)."""
        from perceive.draw import draw_answer

        return draw_answer(image, self, show_proposals)

    def _class_ids(self, class_ids: dict[str, int] | None) -> np.ndarray:
        if class_ids is None:  # a stable index per distinct phrase, in order of appearance
            order: dict[str, int] = {}
            for o in self.objects:
                order.setdefault(o.phrase, len(order))
            class_ids = order
        missing = sorted({o.phrase for o in self.objects} - class_ids.keys())
        if missing:
            raise KeyError(f"phrases missing from class_ids: {missing}")
        return np.array([class_ids[o.phrase] for o in self.objects], dtype=int)

    def to_supervision(self, class_ids: dict[str, int] | None = None) -> Any:
        """A ``supervision.Detections`` of the objects.

        ``xyxy`` and ``confidence`` come from the boxes and scores, ``class_id`` from ``class_ids`` by
        phrase (a ``KeyError`` names phrases it lacks) or, without it, a stable index per distinct
        phrase in order of appearance, and ``data["phrase"]`` holds the phrases. ``mask`` (bool
        ``[N, H, W]``) is decoded from the RLEs when every object has one (all must share one size).
        Keypoints are not part of ``Detections``: :meth:`to_supervision_keypoints` returns them as
        ``supervision.KeyPoints``. Needs the optional package supervision (``perceive[supervision]``).
        """
        sv = _import_supervision()
        n = len(self.objects)
        xyxy = np.array([[float(v) for v in o.box] for o in self.objects], dtype=np.float32).reshape(n, 4)
        mask = None
        if n and all(o.mask is not None for o in self.objects):
            from perceive.boxes import rle_to_mask

            masks = [rle_to_mask(o.mask) for o in self.objects if o.mask is not None]
            sizes = {m.shape for m in masks}
            if len(sizes) != 1:
                raise ValueError(f"the objects' masks differ in size: {sorted(sizes)}")
            mask = np.stack(masks).astype(bool)
        return sv.Detections(
            xyxy=xyxy,
            mask=mask,
            confidence=np.array([float(o.score) for o in self.objects], dtype=np.float32),
            class_id=self._class_ids(class_ids),
            data={"phrase": np.array([o.phrase for o in self.objects], dtype=str)},
        )

    def to_supervision_keypoints(self, class_ids: dict[str, int] | None = None) -> Any:
        """A ``supervision.KeyPoints`` of the objects that have keypoints (COCO's 17 person points).

        ``xy`` is ``[N, 17, 2]``; absent points (v = 0) are at (0, 0), supervision's and COCO's
        convention for a missing point. Where the installed supervision knows them, ``visible``
        is ``v > 0`` and ``detection_confidence`` the objects' scores; answers carry no per-point
        confidence, so ``keypoint_confidence`` stays None. ``class_id`` is as in
        :meth:`to_supervision` (computed over all objects); ``data`` holds ``phrase`` and ``object``
        (each row's index in ``objects``).
        """
        sv = _import_supervision()
        rows = [i for i, o in enumerate(self.objects) if o.keypoints is not None]
        k = len(COCO_PERSON_KEYPOINTS)
        kps = np.array([self.objects[i].keypoints for i in rows], dtype=np.float32).reshape(len(rows), k, 3)
        present = kps[:, :, 2] > 0
        xy = np.where(present[:, :, None], kps[:, :, :2], 0.0).astype(np.float32)
        kwargs: dict[str, Any] = {
            "xy": xy,
            "class_id": self._class_ids(class_ids)[rows] if rows else np.zeros(0, dtype=int),
            "data": {
                "phrase": np.array([self.objects[i].phrase for i in rows], dtype=str),
                "object": np.array(rows, dtype=int),
            },
        }
        params = inspect.signature(sv.KeyPoints).parameters
        if "visible" in params:
            kwargs["visible"] = present
        if "detection_confidence" in params:
            kwargs["detection_confidence"] = np.array([float(self.objects[i].score) for i in rows], dtype=np.float32)
        return sv.KeyPoints(**kwargs)
