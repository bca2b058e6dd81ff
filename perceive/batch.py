"""``perceive ask --images FOLDER_OR_JSONL --question "..." --out OUT``: many images, resumable.

Inputs: a folder (its image files, sorted by name) or a JSONL file of ``{"image": path, "question"?:
str, "id"?: str, "boxes"?: [[x0, y0, x1, y1], ...]}`` (relative paths are relative to the JSONL file;
``boxes`` are the image's own boxes, which the model chooses among instead of its proposals; ``propose``, an image
-> boxes function such as the released UPN's, gives them to the images without). Outputs in ``OUT``:
``results.jsonl`` (one line per image: its id, image, question and the ``ask --json`` answer, or an
``error``), ``coco_results.json`` (objects whose phrase names a world category, with their
confidence as score) and, with ``draw``, ``annotated/<id>.png``. Lines are appended as answers come,
so an interrupted run picks up after the last finished image; an image that failed is recorded and
not retried. A line cut by a full disk or a power cut is dropped when the run resumes (the file is
truncated after its last whole line), so its image is asked again.

A folder's images are named by their stem, or by their file name where two share a stem (``x.png``
and ``x.jpg``), so ids are unique and the same from run to run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from perceive.boxes import check_pixel_boxes
from perceive.data.readers import iter_jsonl

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_inputs(source: str | Path, question: str | None, boxes: list | None = None) -> list[dict]:
    """One item per image: ``id``, ``image``, ``question`` and, where given (in the line, else ``boxes`` for
    every image), ``boxes``."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files in {src}")
        if question is None:
            raise ValueError("--question is required with a folder of images")
        shared = {} if boxes is None else {"boxes": boxes}
        names = folder_ids(files)
        return [{"id": names[p], "image": str(p), "question": question, **shared} for p in files]
    if not src.is_file():
        raise FileNotFoundError(f"no such folder or JSONL file: {src}")
    items = []
    for lineno, rec in iter_jsonl(src):
        if not isinstance(rec.get("image"), str):
            raise ValueError(f"{src}:{lineno}: expected an object with an 'image' path")
        q = rec.get("question", question)
        if not isinstance(q, str) or not q:
            raise ValueError(f"{src}:{lineno}: no question (give one in the line or with --question)")
        path = Path(rec["image"])
        item = {"id": str(rec.get("id", path.stem)), "image": str(path if path.is_absolute() else src.parent / path),
                "question": q}  # fmt: skip
        own = rec.get("boxes", boxes)
        if own is not None:
            item["boxes"] = check_pixel_boxes(own, f"{src}:{lineno}: boxes").tolist()
        items.append(item)
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{src}: ids repeat; give each line a unique 'id'")
    return items


def folder_ids(files: list[Path]) -> dict[Path, str]:
    """Each file's stem, or its name where the stem is not unique (names within a folder are)."""
    ids = {p: p.stem for p in files}
    while True:
        counts = Counter(ids.values())
        clashing = [p for p in files if counts[ids[p]] > 1 and ids[p] != p.name]
        if not clashing:
            return ids
        for p in clashing:
            ids[p] = p.name


def result_line(line: bytes, body: str = "objects") -> dict | None:
    """The result a line of a results.jsonl holds (an object with a string ``id`` and an ``error`` or a list
    ``body``), or None for a cut or otherwise broken one."""
    try:
        rec = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
        return None
    return rec if "error" in rec or isinstance(rec.get(body), list) else None


def repair_results(results: Path, record: Callable[[bytes], dict | None] = result_line) -> set[str]:
    """The ids ``results`` records, leaving the file whole lines only (broken ones dropped, their images undone);
    ``record`` reads a line into its result, None for a broken one.

    A cut last line (the usual damage: a full disk, a power cut) is truncated away in place, which needs no
    free space and keeps every byte before it; broken lines further up (left by versions that appended onto a
    cut line) are dropped by writing the good lines to a new file that replaces the old one atomically."""
    data = results.read_bytes()
    kept: list[bytes] = []
    ids: set[str] = set()
    for line in data.split(b"\n"):
        rec = record(line) if line.strip() else None
        if rec is not None:
            kept.append(line + b"\n")
            ids.add(rec["id"])
    fixed = b"".join(kept)
    if fixed == data:
        return ids
    if data.startswith(fixed):  # only a cut tail
        os.truncate(results, len(fixed))
    elif fixed.startswith(data):  # the last record is whole but its newline was cut
        with open(results, "ab") as f:
            f.write(fixed[len(data) :])
    else:
        tmp = results.with_name(results.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(fixed)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, results)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{results}: has broken lines and could not be rewritten without them: {e}") from None
    return ids


def run(
    perceiver,
    source: str | Path,
    question: str | None,
    out: str | Path,
    draw: bool = False,
    batch_size: int = 8,
    progress: bool = True,
    boxes: list | None = None,
    propose: Callable[[np.ndarray], list] | None = None,
) -> dict:
    from tqdm import tqdm

    from perceive.images import ImageError, load_image
    from perceive.world.scene import CATEGORY_IDS

    items = list_inputs(source, question, boxes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = repair_results(results) if results.is_file() else set()
    pending = [it for it in items if it["id"] not in done]
    if draw:
        for it in items:  # an id names its picture: one from a JSONL must not reach outside annotated/
            if it["id"] in ("", ".", "..") or Path(it["id"]).name != it["id"]:
                raise ValueError(f"{source}: id {it['id']!r} cannot name a picture (annotated/<id>.png): "
                                 "give ids without slashes, or leave out --draw")  # fmt: skip
        (out / "annotated").mkdir(exist_ok=True)
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="ask", unit="image", disable=not progress)
    with open(results, "a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            good, arrays = [], []
            for it in chunk:
                try:
                    arrays.append(load_image(it["image"]))
                    good.append(it)
                except ImageError as e:
                    f.write(json.dumps({**it, "error": str(e)}) + "\n")
            if good:
                if propose is not None:  # a proposal network's boxes where the input gives none
                    for it, arr in zip(good, arrays, strict=True):
                        it.setdefault("boxes", propose(arr))
                answers = perceiver.ask_batch(arrays, [it["question"] for it in good],
                                              boxes=[it.get("boxes") for it in good])  # fmt: skip
                for it, arr, ans in zip(good, arrays, answers, strict=True):
                    f.write(json.dumps({**it, **ans.to_json()}) + "\n")
                    if draw:
                        ans.draw(arr).save(out / "annotated" / f"{it['id']}.png")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    order = {it["id"]: i + 1 for i, it in enumerate(items)}
    coco, errors, answered, seen = [], 0, 0, set()
    for lineno, line in enumerate(results.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        rec = result_line(line)
        if rec is None:  # repaired above and appended whole since: only another writer could have broken it
            raise ValueError(f"{results}:{lineno}: not a whole result line (is another run writing to {out}?)")
        if rec["id"] not in order or rec["id"] in seen:  # an image no longer in the input, or a repeat
            continue
        seen.add(rec["id"])
        if "error" in rec:
            errors += 1
            continue
        answered += 1
        for o in rec["objects"]:
            if o["phrase"] in CATEGORY_IDS:
                x0, y0, x1, y1 = o["box"]
                coco.append({"image_id": order[rec["id"]], "category_id": CATEGORY_IDS[o["phrase"]],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": o["score"]})  # fmt: skip
    (out / "coco_results.json").write_text(json.dumps(coco))
    return {"images": len(items), "answered": answered, "errors": errors, "skipped_as_done": len(items) - len(pending)}
