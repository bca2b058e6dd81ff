"""Seeded scene generator: same seed and config, same scene, byte for byte.

Layout rules (they are what the language module and its checker rely on):
- the ground starts at a horizon line; sky above it; below, one or two ground stuff classes;
- every instance (shape, person) is placed so its box overlaps any other by at most
  ``max_overlap`` of the smaller box, so nothing is hidden for the most part;
- objects are drawn far to near, ordered by the bottom of their box (lower in the picture = nearer),
  so occlusion, z-order and the depth map agree; a held item is drawn right after its holder;
- persons stand on the ground and face the viewer.
Only Python's ``random.Random(seed)`` draws numbers, so scenes are identical on every platform.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from perceive.world.scene import (
    COLORS,
    ITEMS,
    KEYPOINTS,
    PATTERNS,
    SHAPES,
    SIZES,
    SKIN,
    STUFF,
    TROUSERS,
    Scene,
    WorldObject,
)

STUFF_NAMES = tuple(STUFF)
SHAPE_SIDE = {"small": (0.08, 0.10), "medium": (0.12, 0.15), "large": (0.17, 0.21)}  # of the image size
PERSON_HEIGHT = {"small": (0.28, 0.32), "medium": (0.35, 0.40), "large": (0.44, 0.50)}
OBJECT_COLORS = tuple(c for c in COLORS if c not in ("black",))


@dataclass(frozen=True)
class WorldConfig:
    """Knobs of the world. ``relation_depth`` (1 or 2) is how deeply referring expressions nest
    ("the person next to the person holding a cup" is depth 2); ``distractor_similarity`` is the
    chance that a new object copies an existing one but for a single attribute."""

    size: int = 256
    min_objects: int = 3
    max_objects: int = 8
    person_share: float = 0.3
    distractor_similarity: float = 0.3
    relation_depth: int = 1
    max_overlap: float = 0.2

    def validate(self) -> None:
        if self.size < 64 or self.size > 2048:
            raise ValueError(f"size must be between 64 and 2048 pixels, got {self.size}")
        if self.min_objects < 1:
            raise ValueError(f"min_objects must be >= 1, got {self.min_objects}")
        if self.max_objects < self.min_objects:
            raise ValueError(f"max_objects ({self.max_objects}) must be >= min_objects ({self.min_objects})")
        if self.max_objects > 30:
            raise ValueError(
                f"max_objects must be <= 30 (more do not fit without hiding each other), got {self.max_objects}"
            )
        for name in ("person_share", "distractor_similarity", "max_overlap"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.relation_depth not in (1, 2):
            raise ValueError(f"relation_depth must be 1 or 2, got {self.relation_depth}")


# ---------------------------------------------------------------------------------------------
# primitives: ("ellipse", (x0, y0, x1, y1)) or ("polygon", [(x, y), ...])
# ---------------------------------------------------------------------------------------------


def _regular(cx: float, cy: float, r: float, n: int, rot: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)
    ]


def _shape_prims(category: str, cx: float, cy: float, side: float) -> list[tuple]:
    r = side / 2
    if category == "circle":
        return [("ellipse", (cx - r, cy - r, cx + r, cy + r))]
    if category == "square":
        q = r * 0.9
        return [("polygon", [(cx - q, cy - q), (cx + q, cy - q), (cx + q, cy + q), (cx - q, cy + q)])]
    if category == "triangle":
        return [("polygon", [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)])]
    if category == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return [("polygon", pts)]
    if category == "hexagon":
        return [("polygon", _regular(cx, cy, r, 6, 0.0))]
    if category == "diamond":
        return [("polygon", [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)])]
    raise ValueError(f"unknown shape {category!r}")


def _bar(p: tuple[float, float], q: tuple[float, float], width: float) -> tuple:
    """A thick segment as a quadrilateral (limbs, poles)."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * width / 2, dx / n * width / 2
    return ("polygon", [(p[0] + ox, p[1] + oy), (q[0] + ox, q[1] + oy), (q[0] - ox, q[1] - oy), (p[0] - ox, p[1] - oy)])


def _item_prims(category: str, hx: float, hy: float, h: float) -> list[tuple]:
    """A held item at hand position (hx, hy) for a figure of height h."""
    if category == "ball":
        r = 0.075 * h
        return [("ellipse", (hx - r, hy - r * 0.6, hx + r, hy + r * 1.4))]
    if category == "cup":
        w, t = 0.07 * h, 0.12 * h
        return [
            (
                "polygon",
                [
                    (hx - w, hy - t * 0.7),
                    (hx + w, hy - t * 0.7),
                    (hx + w * 0.7, hy + t * 0.3),
                    (hx - w * 0.7, hy + t * 0.3),
                ],
            )
        ]
    if category == "flag":
        top = hy - 0.32 * h
        pole = _bar((hx, hy + 0.04 * h), (hx, top), max(1.5, 0.025 * h))
        cloth = ("polygon", [(hx, top), (hx + 0.17 * h, top + 0.05 * h), (hx, top + 0.11 * h)])
        return [pole, cloth]
    raise ValueError(f"unknown item {category!r}")


def _prim_bounds(prims: list[tuple]) -> tuple[float, float, float, float]:
    xs, ys = [], []
    for kind, geo in prims:
        if kind == "ellipse":
            xs += [geo[0], geo[2]]
            ys += [geo[1], geo[3]]
        else:
            xs += [p[0] for p in geo]
            ys += [p[1] for p in geo]
    return min(xs), min(ys), max(xs), max(ys)


def _draw(draw: ImageDraw.ImageDraw, prims: list[tuple], fill: int) -> None:
    for kind, geo in prims:
        if kind == "ellipse":
            x0, y0, x1, y1 = geo
            draw.ellipse((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), fill=fill)
        else:
            draw.polygon([(x - 0.5, y - 0.5) for x, y in geo], fill=fill)


# ---------------------------------------------------------------------------------------------
# persons
# ---------------------------------------------------------------------------------------------


@dataclass
class _Figure:
    cx: float
    feet: float
    h: float
    hand: str  # which hand holds the item, the person's own "left"/"right"

    @property
    def top(self) -> float:
        return self.feet - self.h

    def joints(self) -> dict[str, tuple[float, float]]:
        """Keypoints; the person's left is image right (+x)."""
        cx, t, h = self.cx, self.top, self.h
        j = {
            "nose": (cx, t + 0.12 * h),
            "left_eye": (cx + 0.03 * h, t + 0.10 * h),
            "right_eye": (cx - 0.03 * h, t + 0.10 * h),
            "left_ear": (cx + 0.075 * h, t + 0.11 * h),
            "right_ear": (cx - 0.075 * h, t + 0.11 * h),
        }
        for s, sign in (("left", 1), ("right", -1)):
            j[f"{s}_shoulder"] = (cx + sign * 0.12 * h, t + 0.25 * h)
            j[f"{s}_wrist"] = (cx + sign * 0.25 * h, t + 0.52 * h)
            j[f"{s}_elbow"] = ((j[f"{s}_shoulder"][0] + j[f"{s}_wrist"][0]) / 2, (t + 0.25 * h + t + 0.52 * h) / 2)
            j[f"{s}_hip"] = (cx + sign * 0.06 * h, t + 0.58 * h)
            j[f"{s}_ankle"] = (cx + sign * 0.10 * h, t + 0.97 * h)
            j[f"{s}_knee"] = ((j[f"{s}_hip"][0] + j[f"{s}_ankle"][0]) / 2, t + 0.775 * h)
        return j

    def parts(self, with_hat: bool) -> list[tuple[str, str | None, list[tuple]]]:
        """(part name, side, primitives) in drawing order."""
        cx, t, h = self.cx, self.top, self.h
        j = self.joints()
        out: list[tuple[str, str | None, list[tuple]]] = []
        for s in ("left", "right"):
            out.append(("leg", s, [_bar(j[f"{s}_hip"], (j[f"{s}_ankle"][0], self.feet), 0.085 * h)]))
        out.append(
            (
                "torso",
                None,
                [
                    (
                        "polygon",
                        [
                            (cx - 0.13 * h, t + 0.22 * h),
                            (cx + 0.13 * h, t + 0.22 * h),
                            (cx + 0.11 * h, t + 0.6 * h),
                            (cx - 0.11 * h, t + 0.6 * h),
                        ],
                    )
                ],
            )
        )
        for s in ("left", "right"):
            out.append(("arm", s, [_bar(j[f"{s}_shoulder"], j[f"{s}_wrist"], 0.065 * h)]))
        r = 0.09 * h
        out.append(("head", None, [("ellipse", (cx - r, t + 0.12 * h - r * 1.1, cx + r, t + 0.12 * h + r))]))
        if with_hat:
            out.append(
                (
                    "hat",
                    None,
                    [
                        (
                            "polygon",
                            [
                                (cx - 0.12 * h, t + 0.055 * h),
                                (cx + 0.12 * h, t + 0.055 * h),
                                (cx + 0.07 * h, t - 0.04 * h),
                                (cx - 0.07 * h, t - 0.04 * h),
                            ],
                        )
                    ],
                )
            )
        return out

    def prims(self, with_hat: bool, item: str | None) -> list[tuple]:
        out = [p for _, _, prims in self.parts(with_hat) for p in prims]
        if item is not None:
            hx, hy = self.joints()[f"{self.hand}_wrist"]
            out += _item_prims(item, hx, hy, self.h)
        return out


def _overlap_ok(
    box: tuple[float, float, float, float], placed: list[tuple[float, float, float, float]], limit: float
) -> bool:
    ax0, ay0, ax1, ay1 = box
    aa = (ax1 - ax0) * (ay1 - ay0)
    for bx0, by0, bx1, by1 in placed:
        iw = min(ax1, bx1) - max(ax0, bx0)
        ih = min(ay1, by1) - max(ay0, by0)
        if iw > 0 and ih > 0:
            ba = (bx1 - bx0) * (by1 - by0)
            if iw * ih > limit * min(aa, ba):
                return False
    return True


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    kind: str
    attrs: dict
    box: tuple[float, float, float, float]  # planned (amodal) box used for layout and z-order
    figure: _Figure | None = None
    center: tuple[float, float] = (0.0, 0.0)
    side: float = 0.0


def _sample_attrs(rng: random.Random, kind: str) -> dict:
    if kind == "shape":
        return {
            "category": rng.choice(SHAPES),
            "color": rng.choice(OBJECT_COLORS),
            "pattern": rng.choice(PATTERNS),
            "size": rng.choice(SIZES),
        }
    return {
        "size": rng.choice(SIZES),
        "shirt": rng.choice(OBJECT_COLORS),
        "hat": rng.choice(OBJECT_COLORS) if rng.random() < 0.45 else None,
        "item": rng.choice(ITEMS) if rng.random() < 0.6 else None,
        "item_color": rng.choice(OBJECT_COLORS),
    }


def _distractor(rng: random.Random, base: dict, kind: str) -> dict:
    """Copy an existing object's attributes and change exactly one of them."""
    attrs = dict(base)
    pool: tuple[str | None, ...]
    if kind == "shape":
        key = rng.choice(["category", "color", "pattern", "size"])
        pool = {"category": SHAPES, "color": OBJECT_COLORS, "pattern": PATTERNS, "size": SIZES}[key]
    else:
        key = rng.choice(["shirt", "hat", "item"])
        pool = {"shirt": OBJECT_COLORS, "hat": (*OBJECT_COLORS, None), "item": (*ITEMS, None)}[key]
    attrs[key] = rng.choice([v for v in pool if v != base[key]])
    return attrs


def _plan_layout(rng: random.Random, cfg: WorldConfig, horizon: int) -> list[_Plan]:
    s = cfg.size
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    plans: list[_Plan] = []
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        kind = "person" if rng.random() < cfg.person_share else "shape"
        same_kind = [p for p in plans if p.kind == kind]
        if same_kind and rng.random() < cfg.distractor_similarity:
            attrs = _distractor(rng, rng.choice(same_kind).attrs, kind)
        else:
            attrs = _sample_attrs(rng, kind)
        for _attempt in range(40):
            if kind == "shape":
                lo, hi = SHAPE_SIDE[attrs["size"]]
                side = rng.uniform(lo, hi) * s
                cx = rng.uniform(side / 2 + 1, s - side / 2 - 1)
                cy = rng.uniform(side / 2 + 1, s - side / 2 - 1)
                box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
                plan = _Plan(kind, attrs, box, center=(cx, cy), side=side)
            else:
                lo, hi = PERSON_HEIGHT[attrs["size"]]
                h = rng.uniform(lo, hi) * s
                feet_lo = max(horizon + 0.12 * s, 1.05 * h + 2)
                if feet_lo > s - 2:
                    break
                fig = _Figure(
                    rng.uniform(0.44 * h + 2, s - 0.44 * h - 2),
                    rng.uniform(feet_lo, s - 2),
                    h,
                    rng.choice(["left", "right"]),
                )
                plan = _Plan(kind, attrs, _prim_bounds(fig.prims(attrs["hat"] is not None, attrs["item"])), figure=fig)
            if _overlap_ok(plan.box, placed, cfg.max_overlap):
                plans.append(plan)
                placed.append(plan.box)
                break
    return plans


def _stuff_map(rng: random.Random, s: int) -> tuple[np.ndarray, int]:
    horizon = int(s * rng.uniform(0.28, 0.5))
    ground = rng.choice(["grass", "sand", "road"])
    stuff = np.full((s, s), STUFF_NAMES.index(ground), dtype=np.uint8)
    stuff[:horizon] = STUFF_NAMES.index("sky")
    if rng.random() < 0.6:
        other = rng.choice([g for g in ("grass", "sand", "road", "water") if g != ground])
        x_at_horizon = rng.uniform(0.2, 0.8) * s
        slope = rng.uniform(-0.8, 0.8)
        ys, xs = np.mgrid[0:s, 0:s]
        region = (
            (xs > x_at_horizon + slope * (ys - horizon))
            if rng.random() < 0.5
            else (xs < x_at_horizon + slope * (ys - horizon))
        )
        stuff[(ys >= horizon) & region] = STUFF_NAMES.index(other)
    return stuff, horizon


def generate_scene(seed: int, config: WorldConfig | None = None) -> Scene:
    """Generate one scene. Deterministic in ``(seed, config)``."""
    cfg = config or WorldConfig()
    cfg.validate()
    rng = random.Random(seed)
    for _ in range(20):
        scene = _try_scene(rng, seed, cfg)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not lay out a scene for seed {seed} with {cfg}")  # pragma: no cover


def _try_scene(rng: random.Random, seed: int, cfg: WorldConfig) -> Scene | None:
    s = cfg.size
    stuff, horizon = _stuff_map(rng, s)
    plans = _plan_layout(rng, cfg, horizon)
    if len(plans) < cfg.min_objects:
        return None
    plans.sort(key=lambda p: p.box[3])  # far (high in the picture) to near

    label_img = Image.new("I", (s, s), 0)
    draw = ImageDraw.Draw(label_img)
    objects: list[WorldObject] = []
    leaf_colors: dict[int, tuple[int, int, int]] = {}
    leaf_depth: dict[int, float] = {}
    patterned: list[tuple[int, str, int]] = []  # (leaf id, pattern, period)
    expected_area: dict[int, float] = {}
    next_id = 1

    def ground_depth(y: float) -> float:
        return float(0.95 - 0.8 * max(0.0, min(1.0, (y - horizon) / max(1, s - horizon))))

    def add_leaf(obj: WorldObject, prims: list[tuple], color: tuple[int, int, int], depth: float) -> None:
        _draw(draw, prims, obj.id)
        leaf_colors[obj.id] = color
        leaf_depth[obj.id] = depth
        expected_area[obj.id] = _prims_area(prims)
        objects.append(obj)

    for z, plan in enumerate(plans):
        depth = ground_depth(plan.box[3])
        a = plan.attrs
        if plan.kind == "shape":
            obj = WorldObject(
                next_id, "shape", a["category"], plan.side, z, color=a["color"], pattern=a["pattern"], size=a["size"]
            )
            next_id += 1
            add_leaf(obj, _shape_prims(a["category"], *plan.center, plan.side), COLORS[a["color"]], depth)
            if a["pattern"] != "solid":
                patterned.append((obj.id, a["pattern"], max(3, int(plan.side / 5))))
            continue
        fig = plan.figure
        assert fig is not None
        person = WorldObject(next_id, "person", "person", fig.h, z, size=a["size"], shirt=a["shirt"], hat=a["hat"])
        next_id += 1
        objects.append(person)
        for part, side, prims in fig.parts(with_hat=a["hat"] is not None):
            color = {"leg": TROUSERS, "torso": COLORS[a["shirt"]], "arm": SKIN, "head": SKIN}.get(part)
            part_obj = WorldObject(
                next_id, "part", part, fig.h, z, parent=person.id, side=side, color=a["hat"] if part == "hat" else None
            )
            next_id += 1
            add_leaf(part_obj, prims, color if color is not None else COLORS[a["hat"]], depth)
        if a["item"] is not None:
            hx, hy = fig.joints()[f"{fig.hand}_wrist"]
            item = WorldObject(next_id, "item", a["item"], fig.h * 0.15, z, color=a["item_color"], held_by=person.id)
            next_id += 1
            person.holding = item.id
            add_leaf(item, _item_prims(a["item"], hx, hy, fig.h), COLORS[a["item_color"]], depth - 0.005)
        person.keypoints = [(*fig.joints()[k], 0) for k in KEYPOINTS]

    label_map = np.asarray(label_img, dtype=np.int32).copy()
    if not _finalize_geometry(objects, label_map, expected_area):
        return None
    image = _render(label_map, stuff, leaf_colors, patterned)
    depth_map = _depth(label_map, leaf_depth, horizon, s)
    return Scene(seed, s, objects, label_map, stuff, STUFF_NAMES, image, depth_map)


def _prims_area(prims: list[tuple]) -> float:
    total = 0.0
    for kind, geo in prims:
        if kind == "ellipse":
            total += math.pi * (geo[2] - geo[0]) * (geo[3] - geo[1]) / 4
        else:
            total += abs(sum(geo[i][0] * geo[i - 1][1] - geo[i - 1][0] * geo[i][1] for i in range(len(geo)))) / 2
    return total


def _finalize_geometry(objects: list[WorldObject], label_map: np.ndarray, expected: dict[int, float]) -> bool:
    """Boxes and areas from the visible masks; False when something is hidden too much to be fair."""
    areas = np.bincount(label_map.ravel(), minlength=max(o.id for o in objects) + 1)
    slices = ndimage.find_objects(label_map)
    for o in objects:
        if o.kind == "person":
            continue
        sl = slices[o.id - 1] if o.id - 1 < len(slices) else None
        area = int(areas[o.id])
        min_visible = 0.35 if o.kind == "part" else 0.6
        if sl is None or area < max(3, min_visible * expected[o.id]):
            return False
        ys, xs = sl
        o.box = (float(xs.start), float(ys.start), float(xs.stop), float(ys.stop))
        o.area = area
    for o in objects:
        if o.kind != "person":
            continue
        parts = [p for p in objects if p.parent == o.id]
        o.area = sum(p.area for p in parts)
        o.box = (
            min(p.box[0] for p in parts),
            min(p.box[1] for p in parts),
            max(p.box[2] for p in parts),
            max(p.box[3] for p in parts),
        )
        part_ids = {p.id for p in parts}
        kps = []
        h, w = label_map.shape
        for x, y, _ in o.keypoints:
            xi, yi = min(w - 1, max(0, int(x))), min(h - 1, max(0, int(y)))
            kps.append((round(x, 2), round(y, 2), 2 if int(label_map[yi, xi]) in part_ids else 1))
        o.keypoints = kps
    return True


def _render(
    label_map: np.ndarray,
    stuff: np.ndarray,
    leaf_colors: dict[int, tuple[int, int, int]],
    patterned: list[tuple[int, str, int]],
) -> np.ndarray:
    # one lookup table: entries 0..n_stuff-1 are stuff colours, n_stuff + k is leaf k's colour
    n_stuff = len(STUFF_NAMES)
    lut = np.zeros((n_stuff + max(leaf_colors) + 1, 3), dtype=np.uint8)
    lut[:n_stuff] = [STUFF[n] for n in STUFF_NAMES]
    for k, c in leaf_colors.items():
        lut[n_stuff + k] = c
    fg = label_map > 0
    image = lut[np.where(fg, label_map + n_stuff, stuff)]
    if patterned:
        slices = ndimage.find_objects(label_map)
        for leaf, pattern, period in patterned:
            sl = slices[leaf - 1]
            if sl is None:
                continue
            ys, xs = np.mgrid[sl]
            if pattern == "striped":
                on = ((xs + ys) // period) % 2 == 0
            else:
                half = period / 2
                on = ((xs % period) - half + 0.5) ** 2 + ((ys % period) - half + 0.5) ** 2 <= (period * 0.3) ** 2
            sel = on & (label_map[sl] == leaf)
            base = lut[n_stuff + leaf].astype(np.int16)
            second = np.where(base.sum() > 500, base // 3, np.minimum(255, base + 110)).astype(np.uint8)
            image[sl][sel] = second
    # dark outlines wherever the leaf changes, so touching objects stay apart
    edge = np.zeros_like(fg)
    edge[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    edge[1:, :] |= label_map[1:, :] != label_map[:-1, :]
    image[edge] = (image[edge].astype(np.uint16) * 2 // 5).astype(np.uint8)
    return image


def _depth(label_map: np.ndarray, leaf_depth: dict[int, float], horizon: int, s: int) -> np.ndarray:
    """Depth in [0, 1] (1 = far): the sky at 1, the ground nearer towards the bottom, each object
    at the ground depth where it stands, so nearer objects cover farther ones."""
    ys = np.arange(s, dtype=np.float32)[:, None]
    ground = 0.95 - 0.8 * np.clip((ys - horizon) / max(1, s - horizon), 0, 1)
    depth = np.where(ys < horizon, 1.0, ground).astype(np.float32) * np.ones((1, s), dtype=np.float32)
    lut = np.zeros(max(leaf_depth) + 1, dtype=np.float32)
    for k, d in leaf_depth.items():
        lut[k] = d
    fg = label_map > 0
    depth[fg] = lut[label_map[fg]]
    return depth
