"""``perceive engine run --images DIR_OR_JSONL --out DIR``: the engine over many images, resumable.

Each finished image is one line of ``OUT/results.jsonl``, appended as batches finish (an image that failed is a
line with its ``error``, and is not retried). Run the same command again, after a kill or after it finished, and
it skips the images already there; a cut last line is dropped and its image done again. The other files
(``perceive.engine.output``) are written whole from ``results.jsonl`` at the end. ``OUT/run.json`` records what the
run is (its images and settings): a folder that holds another run's output is refused unless ``continue_run``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from perceive.batch import IMAGE_SUFFIXES, folder_ids, repair_results, result_line
from perceive.data.readers import iter_jsonl
from perceive.engine.output import write_outputs
from perceive.engine.stages import EngineConfig, EngineParts, Stage, build_stages, run_stage

# settings that change no output: a run with other values of these is the same run
_NOT_IDENTITY = ("batch_size", "threads")


class EngineFolderError(ValueError):
    """``--out`` holds something other than this run's output."""


def list_images(source: str | Path) -> list[dict]:
    """``{"id", "image"}`` per image of a folder (its image files, sorted) or of a JSONL of ``{"image", "id"?}``
    lines (paths relative to the file)."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no image files in {src}")
        names = folder_ids(files)
        return [{"id": names[p], "image": str(p)} for p in files]
    if not src.is_file():
        raise FileNotFoundError(f"no such folder or JSONL file: {src}")
    items = []
    for lineno, rec in iter_jsonl(src):
        if not isinstance(rec.get("image"), str) or not rec["image"]:
            raise ValueError(f"{src}:{lineno}: expected an object with an 'image' path")
        path = Path(rec["image"])
        path = path if path.is_absolute() else src.parent / path
        items.append({"id": str(rec.get("id", Path(rec["image"]).stem)), "image": str(path)})
    ids = [it["id"] for it in items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{src}: ids repeat; give each line a unique 'id'")
    if not items:
        raise ValueError(f"{src}: no images listed")
    return items


def _result(line: bytes) -> dict | None:
    """The result a line of results.jsonl holds, or None for a cut or otherwise broken one."""
    return result_line(line, "regions")


def run_identity(source: str | Path, config: EngineConfig, parts: EngineParts | None) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_IDENTITY}
    custom = {f.name: type(getattr(parts, f.name)).__name__ for f in dataclasses.fields(EngineParts)
              if parts is not None and getattr(parts, f.name) is not None}  # fmt: skip
    return {"images": str(Path(source).resolve()), "settings": settings, "parts": custom}


def claim_folder(out: Path, identity: dict, continue_run: bool) -> None:
    """Make ``out`` this run's: new, this run's own, or (``continue_run``) another run's taken over."""
    marker = out / "run.json"
    if out.exists() and not out.is_dir():
        raise EngineFolderError(f"{out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise EngineFolderError(f"{out} is not empty and holds no engine run (no run.json); give an empty "
                                    f"or new folder")  # fmt: skip
        try:
            before = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            raise EngineFolderError(f"{marker}: unreadable ({e}); give another --out") from None
        if before != identity and not continue_run:
            changed = sorted(k for k in set(before.get("settings", {})) | set(identity["settings"])
                             if before.get("settings", {}).get(k) != identity["settings"].get(k))  # fmt: skip
            what = [k for k in ("images", "parts") if before.get(k) != identity[k]] + changed
            raise EngineFolderError(f"{out} holds another run's output (it differs in {', '.join(what)}); pass "
                                    f"--continue to add this run's images to it, or give another --out")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name("run.json.tmp")
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    tmp.replace(marker)


def draw_item(item: dict, folder: Path) -> None:
    """A picture of the image's kept regions, each labelled with its expression (else its category)."""
    from perceive.answer import Answer, GroundedObject
    from perceive.engine.output import kept_regions, label
    from perceive.engine.stages import image_of

    if "error" in item or Path(item["id"]).name != item["id"] or item["id"] in ("", ".", ".."):
        return  # an id that cannot name a file in the folder gets no picture
    objects = [GroundedObject(r.get("expression") or label(r), r["box"], r["score"]) for r in kept_regions(item)]
    folder.mkdir(exist_ok=True)
    Answer(item.get("caption", ""), objects).draw(image_of(item)).save(folder / f"{item['id']}.png")


def run_local(stages: list[Stage], pending: list[dict], batch_size: int, on_done) -> None:
    """Every stage over each batch of ``pending`` in this process; ``on_done(items)`` after each batch."""
    for start in range(0, len(pending), batch_size):
        batch = [dict(it) for it in pending[start : start + batch_size]]
        for stage in stages:
            run_stage(stage, batch)
        on_done(batch)


def run(
    source: str | Path,
    out: str | Path,
    config: EngineConfig | None = None,
    parts: EngineParts | None = None,
    continue_run: bool = False,
    ray: str | None = None,
    progress: bool = True,
    limit: int | None = None,
    workers: int = 1,
    draw: bool = False,
) -> dict:
    """Annotate the images of ``source`` into ``out``; returns the summary (``perceive.engine.output``).
    ``ray``: None runs here; "auto" starts a local Ray cluster, an address joins an existing one (``workers``
    actors per stage there). ``draw``: a picture of each image's kept regions in ``out/annotated/<id>.png``."""
    from tqdm import tqdm

    config = config or EngineConfig()
    items = list_images(source)[:limit]
    out = Path(out)
    claim_folder(out, run_identity(source, config, parts), continue_run)
    results = out / "results.jsonl"
    done = repair_results(results, _result) if results.is_file() else set()
    pending = [it for it in items if it["id"] not in done]
    bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="engine", unit="image", disable=not progress)
    with open(results, "a", encoding="utf-8") as f:

        def on_done(batch: list[dict]) -> None:
            for it in batch:
                f.write(json.dumps(it) + "\n")
            f.flush()
            if draw:
                for it in batch:
                    draw_item(it, out / "annotated")
            bar.update(len(batch))

        if ray is None:
            run_local(build_stages(config, parts), pending, config.batch_size, on_done)
        else:
            from perceive.engine.ray_run import run_on_ray

            run_on_ray(build_stages(config, parts), pending, config.batch_size, on_done, ray, workers)
    bar.close()
    finished: dict[str, dict] = {}  # every image the folder holds (a continued run's too), in the order done
    for line in results.read_bytes().split(b"\n"):
        rec = _result(line) if line.strip() else None
        if rec is not None:
            finished.setdefault(rec["id"], rec)
    summary = write_outputs(list(finished.values()), out)
    summary["skipped_as_done"] = len(items) - len(pending)
    return summary
