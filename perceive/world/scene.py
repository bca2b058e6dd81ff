"""The world's scene graph: objects with attributes, parts, background stuff, exact masks.

Every pixel has one *stuff* class (``Scene.stuff_map``) and at most one *leaf* object drawn over it
(``Scene.label_map`` holds leaf ids, 0 for none). Leaves are shapes, held items and the parts of
persons; a person's mask is the union of its parts. Boxes are ``xyxy`` pixel boxes of the visible
mask (continuous edges: a mask covering columns 3..9 has ``x0 = 3, x1 = 10``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from perceive.keypoints import COCO_PERSON_KEYPOINTS, COCO_PERSON_SKELETON

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
ITEMS = ("ball", "cup", "flag")
PARTS = ("head", "torso", "arm", "leg", "hat")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (30, 30, 30),
}
PATTERNS = ("solid", "striped", "dotted")
SIZES = ("small", "medium", "large")
STUFF: dict[str, tuple[int, int, int]] = {
    "sky": (170, 210, 240),
    "grass": (125, 175, 105),
    "sand": (215, 195, 150),
    "road": (125, 125, 130),
    "water": (85, 135, 175),
}
SKIN = (230, 190, 160)
TROUSERS = (60, 60, 90)
# COCO's 17 person keypoints, in COCO order; "left" is the person's own left (image right: figures face us).
KEYPOINTS = COCO_PERSON_KEYPOINTS
SKELETON = COCO_PERSON_SKELETON


def category_table() -> list[dict]:
    """COCO categories of the world, ids stable across versions: things, then parts, then stuff."""
    cats: list[dict] = []
    for name in SHAPES:
        cats.append({"name": name, "supercategory": "shape", "isthing": 1, "granularity": "instance"})
    cats.append(
        {
            "name": "person",
            "supercategory": "person",
            "isthing": 1,
            "granularity": "instance",
            "keypoints": list(KEYPOINTS),
            "skeleton": [list(p) for p in SKELETON],
        }
    )
    for name in ITEMS:
        cats.append({"name": name, "supercategory": "item", "isthing": 1, "granularity": "instance"})
    for name in PARTS:
        cats.append({"name": name, "supercategory": "person part", "isthing": 1, "granularity": "part"})
    for name in STUFF:
        cats.append({"name": name, "supercategory": "stuff", "isthing": 0, "granularity": "stuff"})
    for i, c in enumerate(cats, start=1):
        c["id"] = i
    return cats


CATEGORY_IDS: dict[str, int] = {c["name"]: c["id"] for c in category_table()}


@dataclass
class WorldObject:
    """One object. ``kind`` is "shape", "person", "item" or "part"; attributes that do not apply are None."""

    id: int
    kind: str
    category: str
    scale: float  # continuous size in pixels (the figure height for persons), used by superlatives
    z: int
    color: str | None = None  # shapes and items; a hat's colour
    pattern: str | None = None  # shapes
    size: str | None = None  # shapes and persons: small / medium / large
    shirt: str | None = None  # persons
    hat: str | None = None  # persons: the hat's colour, None without a hat
    holding: int | None = None  # persons: id of the held item
    held_by: int | None = None  # items: id of the person holding it
    parent: int | None = None  # parts: id of their person
    side: str | None = None  # parts: "left"/"right" for arms and legs (the person's own side)
    keypoints: list[tuple[float, float, int]] = field(default_factory=list)  # persons: COCO (x, y, v)
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    area: int = 0

    @property
    def is_instance(self) -> bool:
        return self.kind != "part"

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass
class Scene:
    seed: int
    size: int
    objects: list[WorldObject]
    label_map: np.ndarray  # [H, W] int32 leaf ids, 0 = stuff only
    stuff_map: np.ndarray  # [H, W] uint8 index into STUFF_NAMES
    stuff_names: tuple[str, ...]
    image: np.ndarray  # [H, W, 3] uint8
    depth: np.ndarray  # [H, W] float32, larger is farther (see generator)

    def __post_init__(self) -> None:
        self._by_id = {o.id: o for o in self.objects}

    def get(self, obj_id: int) -> WorldObject:
        return self._by_id[obj_id]

    @property
    def instances(self) -> list[WorldObject]:
        return [o for o in self.objects if o.is_instance]

    def of_kind(self, kind: str) -> list[WorldObject]:
        return [o for o in self.objects if o.kind == kind]

    def parts_of(self, person_id: int) -> list[WorldObject]:
        return [o for o in self.objects if o.parent == person_id]

    def mask(self, obj_id: int) -> np.ndarray:
        """Visible boolean mask of an object (a person's is the union of its parts)."""
        obj = self.get(obj_id)
        if obj.kind == "person":
            ids = [p.id for p in self.parts_of(obj_id)]
            return np.isin(self.label_map, ids)
        return self.label_map == obj_id

    def stuff_mask(self, name: str) -> np.ndarray:
        """Visible pixels of a stuff class: where it lies and no object covers it."""
        k = self.stuff_names.index(name)
        return (self.stuff_map == k) & (self.label_map == 0)

    def present_stuff(self) -> list[str]:
        return [n for n in self.stuff_names if self.stuff_mask(n).any()]
