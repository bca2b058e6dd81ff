"""``perceive serve``: a JSON API and a web page over a ``Perceiver``.

- ``POST /v1/ask`` (multipart: ``image`` or ``image_id``, ``question``, and optionally ``boxes``, a JSON list
  of ``[x0, y0, x1, y1]`` pixel boxes the model chooses among instead of its proposals) answers with the
  JSON of ``perceive ask --json``; the ``X-Image-Id`` header names the encoded image (with its boxes), so
  a follow-up question can send ``image_id`` instead of the file and skip the proposal network and the
  vision encoders.
- ``GET /`` is the web page; ``GET /docs`` and ``/openapi.json`` describe the API.

Safety: one inference worker behind a bounded queue (429 when full), a time limit per request
(504), uploads over a size limit (413), files that are not images or are decompression bombs
(400, with the reason), unknown form fields (400). The server never reads paths from clients,
binds to 127.0.0.1 unless told otherwise, and requires ``Authorization: Bearer <token>`` on the
API when ``PERCEIVE_TOKEN`` is set. Errors answer ``{"detail": ...}``, never a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from perceive.boxes import check_pixel_boxes
from perceive.images import ImageError, load_image

STATIC = Path(__file__).parent / "static"
FIELDS = {"image", "image_id", "question", "boxes"}
log = logging.getLogger("perceive.serve")


@dataclass
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024
    max_question_chars: int = 2000
    queue_size: int = 8  # requests waiting for or in inference; one more is refused with 429
    timeout_s: float = 60.0
    cache_images: int = 32  # encoded images kept for follow-up questions


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def create_app(perceiver, limits: Limits | None = None, token: str | None = None) -> FastAPI:
    limits = limits or Limits()
    token = token if token is not None else os.environ.get("PERCEIVE_TOKEN") or None
    app = FastAPI(title="perceive", version="0.1.0",
                  description="Ask a perception MLLM about an image; answers point at objects by index.")  # fmt: skip
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perceive-infer")
    cache: OrderedDict[str, object] = OrderedDict()
    state = {"in_flight": 0}

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/health")
    async def health() -> dict:
        return {"status": "ok", "queue": state["in_flight"], "queue_size": limits.queue_size}

    def infer(image_bytes: bytes | None, image_id: str | None, question: str, boxes: list | None) -> tuple[dict, str]:
        """Runs on the single worker thread: encode (or reuse) the image with its boxes, answer the question."""
        boxes_key = "" if boxes is None else "-" + hashlib.sha256(json.dumps(boxes).encode()).hexdigest()[:12]
        if image_bytes is not None:
            key = hashlib.sha256(image_bytes).hexdigest()[:32] + boxes_key
            if key not in cache:
                try:
                    array = load_image(image_bytes)
                except ImageError as e:
                    raise ApiError(400, str(e)) from None
                cache[key] = encode(array, boxes)
        else:
            key = image_id or ""
            if key not in cache:
                raise ApiError(404, "unknown image_id (it may have been evicted); send the image again")
            if boxes is not None:  # the same image asked about with other boxes: encoded again with them
                base = key.split("-")[0]
                key = base + boxes_key
                if key not in cache:
                    cache[key] = encode(cache[image_id].array, boxes)  # type: ignore[attr-defined, index]
        cache.move_to_end(key)
        while len(cache) > limits.cache_images:
            cache.popitem(last=False)
        try:
            answer = perceiver.answer([cache[key]], [question])[0]
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return answer.to_json(), key

    def encode(array, boxes: list | None):
        try:
            return perceiver.encode_batch([array], None if boxes is None else [boxes])[0]
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    @app.post("/v1/ask", summary="Ask a question about an image",
              responses={400: {"description": "not an image, a bad question or an unknown field"},
                         413: {"description": "upload too large"}, 429: {"description": "queue full"},
                         504: {"description": "took longer than the time limit"}})  # fmt: skip
    async def ask(request: Request) -> JSONResponse:
        if token is not None:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth, f"Bearer {token}"):
                raise ApiError(401, "missing or wrong bearer token")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_upload_bytes + 4096:
            raise ApiError(413, f"upload over the {limits.max_upload_bytes // (1024 * 1024)} MB limit")
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=limits.max_upload_bytes)
        except Exception as e:  # malformed multipart bodies, too many parts, oversized parts
            status = 413 if "size" in str(e).lower() or "large" in str(e).lower() else 400
            raise ApiError(status, f"could not read the form: {e}") from None
        unknown = sorted(set(form.keys()) - FIELDS)
        if unknown:
            raise ApiError(
                400,
                f"unknown field(s): {', '.join(unknown)}; expected image or image_id, question, and optionally boxes",
            )
        question = form.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "field 'question' is required")
        if len(question) > limits.max_question_chars:
            raise ApiError(400, f"question over {limits.max_question_chars} characters")
        boxes = None
        raw_boxes = form.get("boxes")
        if raw_boxes is not None:
            try:
                boxes = check_pixel_boxes(json.loads(str(raw_boxes)), "boxes").tolist()
            except (json.JSONDecodeError, ValueError) as e:
                raise ApiError(400, f"field 'boxes' must be a JSON list of [x0, y0, x1, y1] pixel boxes: {e}") from None
        upload = form.get("image")
        raw_id = form.get("image_id")
        image_id = raw_id if isinstance(raw_id, str) else None
        data = None
        if upload is not None and not isinstance(upload, str):
            data = await upload.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise ApiError(413, f"upload over the {limits.max_upload_bytes // (1024 * 1024)} MB limit")
        elif not image_id:
            raise ApiError(400, "send an 'image' file or the 'image_id' of an earlier answer")
        if state["in_flight"] >= limits.queue_size:
            raise ApiError(429, "too many requests in the queue; try again shortly")
        state["in_flight"] += 1
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(worker, infer, data, image_id, question, boxes)
            try:
                body, key = await asyncio.wait_for(future, timeout=limits.timeout_s)
            except TimeoutError:
                raise ApiError(504, f"the answer took longer than {limits.timeout_s:g} s") from None
        finally:
            state["in_flight"] -= 1
        return JSONResponse(body, headers={"X-Image-Id": key})

    return app


def serve(model: str | None, host: str, port: int, limits: Limits) -> None:
    import uvicorn

    from perceive.perceiver import load

    perceiver = load(model)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines", host)
    uvicorn.run(create_app(perceiver, limits), host=host, port=port, log_level="info")
