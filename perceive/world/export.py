"""Write world scenes in the field's file formats.

A dataset folder holds::

    images/world_000000.png ...     the scenes (RGB PNG)
    depth/world_000000.png ...      depth maps (16-bit PNG, 0 = near, 65535 = far)
    instances.json                  COCO instances: boxes, RLE masks, parts linked to their person
                                    ("parent_id"), person keypoints, attributes
    panoptic.json, panoptic/*.png   COCO panoptic (segment id = R + 256 G + 256^2 B; parts excluded)
    humanref.jsonl                  HumanRef-style referring: one expression a line
    refs.json                       RefCOCO-style refs (single-object expressions), JSON, never pickle
    language.jsonl                  captions, region descriptions, counting, region QA, visual prompts
    world.json                      how the folder was made (config, seed, count, version)

Boxes are ``[x0, y0, x1, y1]`` pixels everywhere except COCO's ``bbox``, which is ``[x, y, w, h]``
as COCO defines it. Annotation ids are ``image_id * 1000 + object id`` and so are stable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from perceive import __version__
from perceive.boxes import mask_to_rle
from perceive.world.generator import WorldConfig, generate_scene
from perceive.world.language import SceneLanguage, describe
from perceive.world.scene import CATEGORY_IDS, KEYPOINTS, Scene, category_table

STUFF_SEGMENT_BASE = 1000  # panoptic ids of stuff segments: 1000 + stuff index (things use object ids)


def scene_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th scene of a dataset made with ``seed``."""
    return (seed << 20) + index


def image_name(index: int) -> str:
    return f"world_{index:06d}.png"


def ann_id(image_id: int, obj_id: int) -> int:
    return image_id * 1000 + obj_id


def split_of(image_id: int) -> str:
    """RefCOCO-style split, fixed by the image id: 10% val, 10% test, the rest train."""
    return {0: "val", 1: "test"}.get(image_id % 10, "train")


def _xywh(box: tuple[float, ...]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def coco_annotations(scene: Scene, image_id: int) -> list[dict]:
    anns = []
    for o in scene.objects:
        mask = scene.mask(o.id)
        attrs: dict[str, str | int] = {
            k: v
            for k, v in (
                ("color", o.color),
                ("pattern", o.pattern),
                ("size", o.size),
                ("shirt", o.shirt),
                ("hat", o.hat),
                ("side", o.side),
            )
            if v is not None
        }
        if o.holding is not None:
            attrs["holding"] = ann_id(image_id, o.holding)
        ann = {
            "id": ann_id(image_id, o.id),
            "image_id": image_id,
            "category_id": CATEGORY_IDS[o.category],
            "bbox": _xywh(o.box),
            "area": int(mask.sum()),
            "segmentation": mask_to_rle(mask),
            "iscrowd": 0,
            "granularity": "part" if o.kind == "part" else "instance",
            "attributes": attrs,
        }
        if o.parent is not None:
            ann["parent_id"] = ann_id(image_id, o.parent)
        if o.kind == "person":
            ann["keypoints"] = [v for kp in o.keypoints for v in kp]
            ann["num_keypoints"] = sum(1 for kp in o.keypoints if kp[2] > 0)
        anns.append(ann)
    return anns


def panoptic_segments(scene: Scene) -> tuple[np.ndarray, list[dict]]:
    """The panoptic id map ``[H, W]`` and its segments_info (things: instances; stuff: visible stuff)."""
    seg = np.zeros(scene.label_map.shape, dtype=np.int32)
    infos = []
    for k, name in enumerate(scene.stuff_names):
        m = scene.stuff_mask(name)
        if m.any():
            seg[m] = STUFF_SEGMENT_BASE + k
            infos.append((STUFF_SEGMENT_BASE + k, name, m))
    for o in scene.instances:
        m = scene.mask(o.id)
        seg[m] = o.id
        infos.append((o.id, o.category, m))
    out = []
    for sid, name, m in infos:
        ys, xs = np.nonzero(m)
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        out.append(
            {"id": sid, "category_id": CATEGORY_IDS[name], "area": int(m.sum()), "bbox": _xywh(box), "iscrowd": 0}
        )
    return seg, out


def id_map_to_rgb(seg: np.ndarray) -> np.ndarray:
    return np.stack([seg % 256, (seg // 256) % 256, seg // 65536], axis=-1).astype(np.uint8)


def humanref_records(scene: Scene, lang: SceneLanguage, image_id: int, name: str) -> list[dict]:
    candidates = [list(o.box) for o in scene.instances]
    out = []
    for k, e in enumerate(lang.expressions):
        out.append(
            {
                "id": f"{image_id}_{k}",
                "image_name": name,
                "referring": e.text,
                "candidate_boxes": candidates,
                "answer_boxes": [list(scene.get(i).box) for i in e.answer],
                "answer_segmentations": [mask_to_rle(scene.mask(i)) for i in e.answer],
                "domain": e.domain,
                "sub_domain": e.sub_domain,
                "answer_ids": [ann_id(image_id, i) for i in e.answer],
                "program": e.program,
            }
        )
    return out


def refcoco_refs(scene: Scene, lang: SceneLanguage, image_id: int, next_ref: int, next_sent: int) -> list[dict]:
    """One ref per object with single-object sentences (unique descriptions and singular expressions)."""
    sentences: dict[int, list[str]] = {}
    for r in lang.regions:
        if r.referring and scene.get(r.object).kind != "part":
            sentences.setdefault(r.object, []).append(r.referring.rstrip(".").lower())
    for e in lang.expressions:
        if len(e.answer) == 1 and e.domain != "rejection" and e.text not in sentences.get(e.answer[0], []):
            sentences.setdefault(e.answer[0], []).append(e.text)
    refs = []
    for obj_id, sents in sorted(sentences.items()):
        sent_items = []
        for s in dict.fromkeys(sents):
            sent_items.append({"sent_id": next_sent, "sent": s, "raw": s, "tokens": s.split()})
            next_sent += 1
        refs.append(
            {
                "ref_id": next_ref,
                "ann_id": ann_id(image_id, obj_id),
                "image_id": image_id,
                "category_id": CATEGORY_IDS[scene.get(obj_id).category],
                "split": split_of(image_id),
                "sentences": sent_items,
                "sent_ids": [s["sent_id"] for s in sent_items],
            }
        )
        next_ref += 1
    return refs


def language_records(scene: Scene, lang: SceneLanguage, image_id: int, name: str) -> list[dict]:
    def ids(objs: list[int]) -> list[int]:
        return [ann_id(image_id, i) for i in objs]

    out: list[dict] = []
    base = {"image_id": image_id, "image_name": name}
    for c in lang.captions:
        out.append(
            {
                **base,
                "type": c.kind,
                "text": c.text,
                "phrases": [{**p, "objects": ids(p["objects"])} for p in c.phrases],
            }
        )
    for r in lang.regions:
        out.append(
            {
                **base,
                "type": "region_caption",
                "object": ann_id(image_id, r.object),
                "category": r.category,
                "short_phrase": r.short_phrase,
                "brief": r.brief,
                "referring": r.referring,
            }
        )
    for q in lang.questions:
        out.append(
            {
                **base,
                "type": q.kind,
                "question": q.question,
                "answer": q.answer,
                "objects": ids(q.objects),
                "answer_objects": ids(q.answer_objects),
            }
        )
    for vp in lang.visual_prompts:
        d = asdict(vp)
        d["object"] = ann_id(image_id, vp.object)
        out.append({**base, "type": "visual_prompt", **d})
    return out


def _depth_png(depth: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(depth, 0, 1) * 65535).round().astype(np.uint16))


def iter_scenes(n: int, seed: int, config: WorldConfig) -> Iterator[tuple[int, Scene, SceneLanguage]]:
    """Stream ``(index, scene, language)`` without touching the disk (training uses this)."""
    for i in range(n):
        scene = generate_scene(scene_seed(seed, i), config)
        yield i, scene, describe(scene, config)


def write_dataset(
    out: str | os.PathLike,
    n: int,
    seed: int = 0,
    config: WorldConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generate ``n`` scenes into ``out``. Writes into a temporary folder beside ``out`` and moves it
    into place only when everything is written, so an error or an interrupt leaves nothing partial."""
    cfg = config or WorldConfig()
    cfg.validate()
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_into(tmp, n, seed, cfg, progress)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_into(root: Path, n: int, seed: int, cfg: WorldConfig, progress: bool) -> None:
    from tqdm import tqdm

    for sub in ("images", "depth", "panoptic"):
        (root / sub).mkdir()
    cats = category_table()
    images, anns, pan_anns = [], [], []
    next_ref = next_sent = 0
    refs: list[dict] = []
    with open(root / "humanref.jsonl", "w") as href, open(root / "language.jsonl", "w") as lang_file:
        for i, scene, lang in tqdm(
            iter_scenes(n, seed, cfg), total=n, desc="world", unit="scene", disable=not progress
        ):
            image_id = i + 1
            name = image_name(i)
            Image.fromarray(scene.image).save(root / "images" / name)
            _depth_png(scene.depth).save(root / "depth" / name)
            images.append(
                {"id": image_id, "file_name": name, "width": scene.size, "height": scene.size, "seed": scene.seed}
            )
            anns.extend(coco_annotations(scene, image_id))
            seg, infos = panoptic_segments(scene)
            Image.fromarray(id_map_to_rgb(seg)).save(root / "panoptic" / name)
            pan_anns.append({"image_id": image_id, "file_name": name, "segments_info": infos})
            for rec in humanref_records(scene, lang, image_id, name):
                href.write(json.dumps(rec) + "\n")
            new_refs = refcoco_refs(scene, lang, image_id, next_ref, next_sent)
            next_ref += len(new_refs)
            next_sent += sum(len(r["sentences"]) for r in new_refs)
            refs.extend(new_refs)
            for rec in language_records(scene, lang, image_id, name):
                lang_file.write(json.dumps(rec) + "\n")
    instance_cats = [{k: v for k, v in c.items() if k != "isthing"} for c in cats if c["granularity"] != "stuff"]
    panoptic_cats = [
        {"id": c["id"], "name": c["name"], "supercategory": c["supercategory"], "isthing": c["isthing"]}
        for c in cats
        if c["granularity"] != "part"
    ]
    info = {"description": "perceive synthetic world", "version": __version__}
    (root / "instances.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": anns, "categories": instance_cats})
    )
    (root / "panoptic.json").write_text(
        json.dumps({"info": info, "images": images, "annotations": pan_anns, "categories": panoptic_cats})
    )
    (root / "refs.json").write_text(json.dumps(refs))
    (root / "world.json").write_text(
        json.dumps(
            {
                "generator": "perceive.world",
                "version": __version__,
                "seed": seed,
                "n": n,
                "config": asdict(cfg),
                "keypoints": list(KEYPOINTS),
            },
            indent=2,
        )
    )
