"""The batch command against damage (issue 41): a results.jsonl cut anywhere is repaired on resume, so
every image is answered exactly once and coco_results.json is written; two files with one stem keep
their own ids and pictures. A fake perceiver stands in for the model."""

import json

import numpy as np
import pytest
from PIL import Image

from perceive import batch
from perceive.answer import Answer, GroundedObject

QUESTION = "Please detect circle in this image. Answer the question with object indexes."


class FakePerceiver:
    """Answers a circle in the image's top-left corner, scored by its first pixel (which names the image)."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def ask_batch(self, images, questions, boxes=None):
        answers = []
        for image in images:
            shade = int(image[0, 0, 0])
            self.asked.append(shade)
            box = [0.0, 0.0, 3.0, 3.0]
            answers.append(Answer(text="<obj0>", objects=[GroundedObject("circle", box, shade / 255, index=0)]))
        return answers


SHADES = {"a": 10, "b": 20, "c": 30, "d": 40, "e": 50}


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, shade in SHADES.items():
        Image.new("RGB", (12, 8), (shade, 0, 0)).save(images / f"{name}.png")
    return images


def _run(folder, out, perceiver=None):
    perceiver = perceiver or FakePerceiver()
    summary = batch.run(perceiver, folder, QUESTION, out, batch_size=2, progress=False)
    return perceiver, summary


def _ids(out):
    return [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]


def _records(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _line_with_non_ascii(line: bytes) -> bytes:
    """The same record with a non-ASCII answer written raw (as UTF-8), so a cut can fall inside a character."""
    rec = json.loads(line)
    rec["answer"] = "cercle à l'écran ☺"
    return json.dumps(rec, ensure_ascii=False).encode()


def _cut_inside_a_character(line: bytes) -> int:
    return line.index("☺".encode()) + 1


# how the fourth line (image d) was cut, and whether it survives as a whole record
CUTS = {
    "after its first byte": (lambda line: 1, False),
    "in the middle of the JSON": (lambda line: len(line) // 2, False),
    "just before its closing brace": (lambda line: len(line) - 1, False),
    "inside a UTF-8 character": (_cut_inside_a_character, False),
    "whole but for its newline": (lambda line: len(line), True),
}


@pytest.mark.parametrize("cut", CUTS)
def test_a_cut_last_line_is_repaired_and_its_image_asked_again(folder, tmp_path, cut):
    out = tmp_path / "out"
    first, summary = _run(folder, out)
    assert sorted(first.asked) == sorted(SHADES.values()) and summary["answered"] == 5
    whole = (out / "results.jsonl").read_bytes().split(b"\n")[:-1]
    fourth = _line_with_non_ascii(whole[3])
    where, survives = CUTS[cut]
    (out / "results.jsonl").write_bytes(b"\n".join(whole[:3]) + b"\n" + fourth[: where(fourth)])  # e never written
    (out / "coco_results.json").unlink()

    resumed, summary = _run(folder, out)
    assert sorted(resumed.asked) == ([50] if survives else [40, 50])
    assert sorted(_ids(out)) == ["a", "b", "c", "d", "e"]  # every image exactly once
    assert summary == {"images": 5, "answered": 5, "errors": 0, "skipped_as_done": 4 if survives else 3}
    coco = json.loads((out / "coco_results.json").read_text())
    assert sorted(r["image_id"] for r in coco) == [1, 2, 3, 4, 5]
    assert sorted(round(r["score"] * 255) for r in coco) == sorted(SHADES.values())
    assert (out / "results.jsonl").read_bytes().startswith(b"\n".join(whole[:3]) + b"\n")  # no whole line lost

    again, summary = _run(folder, out)  # and the run after that has nothing left to do
    assert again.asked == [] and summary["skipped_as_done"] == 5


def test_a_line_glued_onto_a_cut_one_by_an_older_version_is_dropped_and_both_asked_again(folder, tmp_path):
    out = tmp_path / "out"
    _run(folder, out)
    lines = (out / "results.jsonl").read_bytes().split(b"\n")[:-1]
    glued = lines[1][:40] + lines[2]  # b's fragment with c appended onto it; d and e after, whole
    (out / "results.jsonl").write_bytes(b"\n".join([lines[0], glued, lines[3], lines[4]]) + b"\n")
    resumed, summary = _run(folder, out)
    assert sorted(resumed.asked) == [20, 30] and summary["skipped_as_done"] == 3
    assert sorted(_ids(out)) == ["a", "b", "c", "d", "e"] and summary["answered"] == 5
    assert not (out / "results.jsonl.tmp").exists()


def test_two_files_with_one_stem_get_their_own_ids_and_pictures(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (12, 8), (60, 0, 0)).save(images / "x.png")
    Image.new("RGB", (12, 8), (90, 0, 0)).save(images / "x.jpg", quality=100)
    Image.new("RGB", (12, 8), (120, 0, 0)).save(images / "x.png.bmp")  # its stem is the other's file name
    Image.new("RGB", (12, 8), (150, 0, 0)).save(images / "y.png")
    out = tmp_path / "out"
    perceiver = FakePerceiver()
    summary = batch.run(perceiver, images, QUESTION, out, draw=True, progress=False)
    by_id = {r["id"]: r for r in _records(out)}
    assert sorted(by_id) == ["x.jpg", "x.png", "x.png.bmp", "y"] and summary["answered"] == 4
    shades = {"x.jpg": 90, "x.png": 60, "x.png.bmp": 120, "y": 150}
    asked = {i: round(r["objects"][0]["score"] * 255) for i, r in by_id.items()}
    drawn = {i: int(np.asarray(Image.open(out / "annotated" / f"{i}.png").convert("RGB"))[-1, -1, 0]) for i in by_id}
    for i, shade in shades.items():  # each answered and drawn from its own image (the JPEG within its rounding)
        assert abs(asked[i] - shade) <= 2 and abs(drawn[i] - shade) <= 2
    again = FakePerceiver()
    batch.run(again, images, QUESTION, out, draw=True, progress=False)
    assert again.asked == []  # the ids are the same on the next run, so it resumes


def test_an_id_that_would_write_outside_the_pictures_folder_is_refused(tmp_path):
    Image.new("RGB", (12, 8)).save(tmp_path / "a.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "a.png", "id": "../../escaped"}) + "\n")
    with pytest.raises(ValueError, match=r"id '\.\./\.\./escaped' cannot name a picture"):
        batch.run(FakePerceiver(), tmp_path / "in.jsonl", QUESTION, tmp_path / "out", draw=True, progress=False)
    assert not list(tmp_path.rglob("escaped*"))
