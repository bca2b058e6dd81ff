import io
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from perceive.serve.app import Limits, create_app
from perceive.world.generator import WorldConfig, generate_scene

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
QUESTION = "Please detect circle; person in this image. Answer the question with object indexes."


@pytest.fixture(scope="module")
def perceiver(tmp_path_factory):
    """The shipped tiny model when present (boxes then really appear), else a smoke-trained one."""
    from perceive.perceiver import DEFAULT_MODEL, Perceiver

    if (DEFAULT_MODEL / "model.safetensors").is_file():
        return Perceiver.from_pretrained(DEFAULT_MODEL)
    from perceive.train.trainer import train

    out = tmp_path_factory.mktemp("serve") / "run"
    train("smoke", out, progress=False)
    return Perceiver.from_pretrained(out / "model")


def _png(seed: int = 2) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(generate_scene(seed, WorldConfig(size=256, person_share=0.4)).image).save(buf, format="PNG")
    return buf.getvalue()


def test_ask_answers_like_the_cli_and_follow_ups_reuse_the_image(perceiver):
    client = TestClient(create_app(perceiver))
    r = client.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"answer", "objects", "proposals"}
    image_id = r.headers["X-Image-Id"]
    again = client.post("/v1/ask", data={"image_id": image_id, "question": QUESTION})
    assert again.status_code == 200 and again.json() == body  # same image, same question, same answer
    assert client.get("/openapi.json").json()["paths"]["/v1/ask"]["post"]
    assert "<svg" in client.get("/").text


@pytest.mark.parametrize("files, data, status, needle", [
    ({"image": ("x.png", b"not an image", "image/png")}, {"question": "hi"}, 400, "not an image"),
    ({"image": ("x.png", b"", "image/png")}, {"question": "hi"}, 400, "empty"),
    (None, {"question": "hi"}, 400, "image"),
    ({"image": ("x.png", b"x", "image/png")}, {}, 400, "question"),
    ({"image": ("x.png", b"x", "image/png")}, {"question": "hi", "path": "/etc/passwd"}, 400, "unknown field"),
    (None, {"image_id": "nope", "question": "hi"}, 404, "unknown image_id"),
])  # fmt: skip
def test_bad_requests_get_clear_errors(perceiver, files, data, status, needle):
    client = TestClient(create_app(perceiver), raise_server_exceptions=False)
    r = client.post("/v1/ask", files=files, data=data)
    assert r.status_code == status and needle in r.json()["detail"]
    assert "Traceback" not in r.text


def test_size_limit_bomb_token_and_queue(perceiver, monkeypatch):
    small = TestClient(create_app(perceiver, Limits(max_upload_bytes=1000)), raise_server_exceptions=False)
    r = small.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": "hi"})
    assert r.status_code == 413
    from perceive import images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    r = TestClient(create_app(perceiver)).post(
        "/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": "hi"}
    )
    assert r.status_code == 400 and "limit" in r.json()["detail"]
    monkeypatch.undo()
    secured = TestClient(create_app(perceiver, token="s3cret"))
    r = secured.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": "hi"})
    assert r.status_code == 401
    r = secured.post(
        "/v1/ask",
        files={"image": ("s.png", _png(), "image/png")},
        data={"question": QUESTION},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert r.status_code == 200
    full = TestClient(create_app(perceiver, Limits(queue_size=0)))
    r = full.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": "hi"})
    assert r.status_code == 429


def test_time_limit(perceiver):
    slow = TestClient(create_app(perceiver, Limits(timeout_s=0.001)))
    r = slow.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": QUESTION})
    assert r.status_code == 504


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make setup installs it)")
def test_the_page_in_a_real_browser(perceiver, tmp_path):
    import uvicorn
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(perceiver), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    image = tmp_path / "scene.png"
    image.write_bytes(_png())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#file", str(image))
            page.fill("#question", QUESTION)
            page.click("#send")
            page.wait_for_selector(".turn .a", timeout=60_000)
            page.check("#proposals")
            page.wait_for_selector("#overlay rect.prop", state="attached", timeout=10_000)
            n_props = page.locator("#overlay rect.prop").count()
            n_objs = page.locator("#overlay rect.obj").count()
            assert n_props > 0
            answer = json.loads(page.evaluate("JSON.stringify(last)"))
            assert n_objs == sum(1 for _ in answer["objects"])
            if answer["objects"]:  # hovering a phrase with objects highlights exactly its boxes
                phrase = answer["objects"][0]["phrase"]
                page.locator(".turn").first.locator(".phrase", has_text=phrase).first.hover()
                want = sum(o["phrase"] == phrase for o in answer["objects"])
                assert page.locator("#overlay rect.obj.hot").count() == want
            # a follow-up reuses the encoded image
            page.click("#send")
            page.wait_for_function("document.querySelectorAll('.turn').length >= 2", timeout=60_000)
            assert "already encoded" in page.evaluate("document.body.innerHTML") or page.locator(".turn").count() >= 2
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert (ARTIFACTS / "serve_page.png").stat().st_size > 10_000


def test_batch_ask_resumes_without_repeating(perceiver, tmp_path, monkeypatch):
    from perceive import batch

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"s{i}.png").write_bytes(_png(i))
    (folder / "broken.png").write_bytes(b"nope")
    out = tmp_path / "out"
    first = batch.run(perceiver, folder, QUESTION, out, draw=True, batch_size=2, progress=False)
    assert first == {"images": 4, "answered": 3, "errors": 1, "skipped_as_done": 0}
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (out / "annotated" / "s0.png").is_file()
    asked = []
    monkeypatch.setattr(perceiver, "ask_batch", lambda ims, qs: asked.append(len(ims)) or [])
    again = batch.run(perceiver, folder, QUESTION, out, progress=False)
    assert asked == [] and again["skipped_as_done"] == 4
    assert isinstance(json.loads((out / "coco_results.json").read_text()), list)
    # a JSONL of images with their own questions
    jl = tmp_path / "list.jsonl"
    jl.write_text(json.dumps({"image": "imgs/s0.png", "id": "a"}) + "\n")
    with pytest.raises(ValueError, match="no question"):
        batch.list_inputs(jl, None)
    assert batch.list_inputs(jl, "q")[0]["image"] == str(tmp_path / "imgs" / "s0.png")
    assert np.isfinite(1.0)


def test_the_users_boxes_reach_the_model_through_the_api(perceiver):
    client = TestClient(create_app(perceiver))
    boxes = [[10, 20, 60, 120], [80, 15, 130, 118]]
    r = client.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")},
                    data={"question": QUESTION, "boxes": json.dumps(boxes)})  # fmt: skip
    assert r.status_code == 200, r.text
    assert [p["box"] for p in r.json()["proposals"]] == boxes
    assert all(o["index"] < 2 for o in r.json()["objects"])
    plain = client.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")}, data={"question": QUESTION})
    assert plain.headers["X-Image-Id"] != r.headers["X-Image-Id"] and len(plain.json()["proposals"]) != 2
    # a follow-up on the same image with other boxes is encoded again with them
    other = client.post("/v1/ask", data={"image_id": plain.headers["X-Image-Id"], "question": QUESTION,
                                         "boxes": json.dumps(boxes[:1])})  # fmt: skip
    assert other.status_code == 200 and [p["box"] for p in other.json()["proposals"]] == boxes[:1]
    for bad in ("[[1, 2, 3]]", "[[5, 5, 1, 1]]", "not json", '{"a": 1}'):
        r = client.post("/v1/ask", files={"image": ("s.png", _png(), "image/png")},
                        data={"question": QUESTION, "boxes": bad})  # fmt: skip
        assert r.status_code == 400 and "boxes" in r.json()["detail"], (bad, r.text)


def test_batch_lines_carry_their_own_boxes(perceiver, tmp_path):
    from perceive import batch

    (tmp_path / "s0.png").write_bytes(_png(0))
    (tmp_path / "s1.png").write_bytes(_png(1))
    jl = tmp_path / "list.jsonl"
    jl.write_text(json.dumps({"image": "s0.png", "boxes": [[0, 0, 50, 50], [60, 60, 120, 140]]}) + "\n"
                  + json.dumps({"image": "s1.png"}) + "\n")  # fmt: skip
    summary = batch.run(perceiver, jl, QUESTION, tmp_path / "out", progress=False)
    assert summary["answered"] == 2
    first, second = (json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    assert [p["box"] for p in first["proposals"]] == [[0, 0, 50, 50], [60, 60, 120, 140]]
    assert len(second["proposals"]) > 2  # no boxes of its own: the proposal network's
    # --boxes for every image of a folder, and a bad line named by its number
    items = batch.list_inputs(tmp_path, QUESTION, boxes=[[1, 1, 9, 9]])
    assert all(it["boxes"] == [[1, 1, 9, 9]] for it in items)
    jl.write_text(json.dumps({"image": "s0.png", "boxes": [[5, 5, 1]]}) + "\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: boxes"):
        batch.list_inputs(jl, QUESTION)
