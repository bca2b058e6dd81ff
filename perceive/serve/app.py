"""``perceive serve``: a JSON API and a web page over a ``Perceiver``.

- ``POST /v1/ask`` (multipart: ``image`` or ``image_id``, ``question``, and optionally ``boxes``, a JSON list
  of ``[x0, y0, x1, y1]`` pixel boxes the model chooses among instead of its proposals, or ``prompts``, a JSON
  list of visual prompts for a model that takes them, ``perceive.prompts.prompts_from_json``) answers with the
  JSON of ``perceive ask --json``; the ``X-Image-Id`` header names the encoded image (with its boxes), so
  a follow-up question can send ``image_id`` instead of the file and skip the proposal network and the
  vision encoders. Ids are random per upload: they reveal nothing about the image.
- ``GET /`` is the web page; ``GET /docs`` (a self-contained page, no external script) and ``/openapi.json``
  describe the API.

Safety: one inference worker behind a bounded queue (429 when full), a time limit per request
(504), uploads over a size limit (413, counted as the bytes arrive, chunked or not), uploads slower
than a time limit (408), uploads being received together past a memory budget of ``queue_size``
uploads (429), files that are not images or are decompression bombs (400, with the reason), unknown
form fields (400). Connections (``perceive.serve.connections``): a request head must arrive within a
time limit and its body within another, and the open connections are capped. Requests whose ``Host``
is not this server's or whose ``Origin`` is another site's get 403 (``perceive.serve.same_site``). The
server never reads paths from clients, binds to 127.0.0.1 unless told otherwise, and requires
``Authorization: Bearer <token>`` on the API when ``PERCEIVE_TOKEN`` is set. Errors answer
``{"detail": ...}``, never a traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message

from perceive.boxes import check_pixel_boxes
from perceive.images import ImageError, load_image
from perceive.prompts import prompts_from_json
from perceive.serve.connections import make_server
from perceive.serve.docs_page import docs_page
from perceive.serve.limits import Limits
from perceive.serve.same_site import SameSiteOnly

STATIC = Path(__file__).parent / "static"
FIELDS = {"image", "image_id", "question", "boxes", "prompts"}
FORM_OVERHEAD = 64 * 1024  # room for the question, the boxes and the multipart headers beside the image
log = logging.getLogger("perceive.serve")


class ApiError(Exception):
    """An answer of ``status`` with ``detail``; ``close``: the request body is left unread, so the connection
    closes after the answer instead of reading the rest."""

    def __init__(self, status: int, detail: str, close: bool = False) -> None:
        super().__init__(detail)
        self.status, self.detail, self.close = status, detail, close


@dataclass
class _Encoded:
    """An uploaded image encoded with its boxes; ``upload_id`` is the id of the upload it came from."""

    array: np.ndarray
    encoded: object
    boxes: list | None
    upload_id: str


ASK_FORM = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {
        "type": "object",
        "required": ["question"],
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "the image file; or send image_id"},
            "image_id": {"type": "string",
                         "description": "the X-Image-Id of an earlier answer: the same encoded image, not sent again"},
            "question": {"type": "string", "description": "the question, at most 2000 characters"},
            "boxes": {"type": "string", "description": "optional JSON list of [x0, y0, x1, y1] pixel boxes the model "
                                                       "chooses among instead of its own proposals"},
            "prompts": {"type": "string", "description": 'optional JSON list of visual prompts, one per <region> of '
                        'the question, for models that take them: {"kind": "point" | "box" | "scribble", "points": '
                        '[[x, y], ...]} in pixels'},
        },
    }}},
}  # fmt: skip


def create_app(perceiver, limits: Limits | None = None, token: str | None = None,
               allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> FastAPI:  # fmt: skip
    limits = limits or Limits()
    token = token if token is not None else os.environ.get("PERCEIVE_TOKEN") or None
    # FastAPI's own /docs loads its script from a CDN (blank offline): ours is generated, self-contained
    app = FastAPI(title="perceive", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Ask a perception MLLM about an image; answers point at objects by index.")  # fmt: skip
    app.add_middleware(SameSiteOnly, allowed_hosts=list(allowed_hosts), allowed_origins=list(allowed_origins))
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="perceive-infer")
    cache: OrderedDict[str, _Encoded] = OrderedDict()
    state = {"in_flight": 0, "receiving": 0}  # requests in inference or waiting; upload bytes held while received
    # uploads being received hold at most this together (a stalled one holds only what it sent): past it, 429
    upload_budget = limits.queue_size * (limits.max_upload_bytes + FORM_OVERHEAD)
    over_limit = f"upload over the {limits.max_upload_bytes / (1024 * 1024):g} MB limit"

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"Connection": "close"} if exc.close else None
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    @app.get("/v1/health", summary="Whether the server is up, and how full its queue is")
    async def health() -> dict:
        return {"status": "ok", "queue": state["in_flight"], "queue_size": limits.queue_size}

    def infer(
        image_bytes: bytes | None, image_id: str | None, question: str, boxes: list | None, prompts: list | None = None
    ) -> tuple[dict, str]:
        """Runs on the single worker thread: encode (or reuse) the image with its boxes, answer the question."""
        if image_bytes is not None:
            try:
                array = load_image(image_bytes)
            except ImageError as e:
                raise ApiError(400, str(e)) from None
            # a random id, not a hash of the image: an id must not tell whether someone uploaded a given image
            key = secrets.token_urlsafe(18)
            cache[key] = _Encoded(array, encode(array, boxes), boxes, key)
        else:
            key = image_id or ""
            if key not in cache:
                raise ApiError(404, "unknown image_id (it may have been evicted); send the image again")
            earlier = cache[key]
            if boxes is not None and boxes != earlier.boxes:  # the same image with other boxes: encoded with them
                boxes_key = hashlib.sha256(json.dumps(boxes).encode()).hexdigest()[:12]
                key = f"{earlier.upload_id}.{boxes_key}"
                if key not in cache:
                    cache[key] = _Encoded(earlier.array, encode(earlier.array, boxes), boxes, earlier.upload_id)
        cache.move_to_end(key)
        while len(cache) > limits.cache_images:
            cache.popitem(last=False)
        try:
            if prompts:
                answer = perceiver.answer([cache[key].encoded], [question], prompts=[prompts])[0]
            else:
                answer = perceiver.answer([cache[key].encoded], [question])[0]
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        return answer.to_json(), key

    def encode(array, boxes: list | None):
        try:
            return perceiver.encode_batch([array], None if boxes is None else [boxes])[0]
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def read_body(request: Request) -> bytes:
        """The request body, counted as it arrives: 413 as soon as it passes the upload limit (chunked uploads
        included, before anything is parsed or spooled to disk), 429 when the uploads being received together would
        pass their memory budget, 408 when it takes longer than the body timeout."""
        cap = limits.max_upload_bytes + FORM_OVERHEAD
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise ApiError(413, over_limit, close=True)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    state["receiving"] += len(chunk)
                    if size > cap:
                        raise ApiError(413, over_limit, close=True)
                    if state["receiving"] > upload_budget:
                        raise ApiError(429, "receiving too many uploads at once; try again shortly", close=True)
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the upload took longer than {limits.body_timeout_s:g} s", close=True) from None
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before the end of the upload") from None
        finally:
            state["receiving"] -= size
        return b"".join(chunks)

    @app.post("/v1/ask", summary="Ask a question about an image", openapi_extra={"requestBody": ASK_FORM},
              responses={200: {"description": "the answer (the JSON of perceive ask --json); the X-Image-Id header "
                                              "names the encoded image for follow-up questions"},
                         400: {"description": "not an image, a bad question or an unknown field"},
                         401: {"description": "missing or wrong bearer token (when PERCEIVE_TOKEN is set)"},
                         403: {"description": "a Host or Origin of another site"},
                         404: {"description": "unknown image_id"}, 408: {"description": "upload too slow"},
                         413: {"description": "upload too large"}, 429: {"description": "queue full"},
                         504: {"description": "took longer than the time limit"}})  # fmt: skip
    async def ask(request: Request) -> JSONResponse:
        if token is not None:
            auth = request.headers.get("authorization", "")
            if not secrets.compare_digest(auth, f"Bearer {token}"):
                raise ApiError(401, "missing or wrong bearer token")
        if state["in_flight"] >= limits.queue_size:  # refused before the upload is read: it would be refused after
            raise ApiError(429, "too many requests in the queue; try again shortly")
        body = await read_body(request)

        async def replay() -> Message:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=1, max_fields=4, max_part_size=limits.max_upload_bytes
            )
        except Exception as e:  # malformed multipart bodies, too many parts, oversized parts
            status = 413 if "size" in str(e).lower() or "large" in str(e).lower() else 400
            raise ApiError(status, f"could not read the form: {e}") from None
        body = b""  # the form holds the upload now
        upload = form.get("image")
        data = None
        if upload is not None and not isinstance(upload, str):
            data = await upload.read(limits.max_upload_bytes + 1)
        await form.close()  # its spooled file, whatever is refused below
        unknown = sorted(set(form.keys()) - FIELDS)
        if unknown:
            raise ApiError(
                400,
                f"unknown field(s): {', '.join(unknown)}; expected image or image_id, question, and optionally boxes "
                f"or prompts",
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
        prompts = None
        raw_prompts = form.get("prompts")
        if raw_prompts is not None:
            if not perceiver.takes_prompts:
                raise ApiError(400, f"this {perceiver.model_type} model takes no visual prompts")
            try:
                prompts = prompts_from_json(json.loads(str(raw_prompts)))
            except (json.JSONDecodeError, ValueError) as e:
                raise ApiError(400, f"field 'prompts': {e}") from None
        raw_id = form.get("image_id")
        image_id = raw_id if isinstance(raw_id, str) else None
        if data is not None:
            if len(data) > limits.max_upload_bytes:
                raise ApiError(413, over_limit)
        elif not image_id:
            raise ApiError(400, "send an 'image' file or the 'image_id' of an earlier answer")
        if state["in_flight"] >= limits.queue_size:
            raise ApiError(429, "too many requests in the queue; try again shortly")
        state["in_flight"] += 1
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(worker, infer, data, image_id, question, boxes, prompts)
            try:
                result, key = await asyncio.wait_for(future, timeout=limits.timeout_s)
            except TimeoutError:
                raise ApiError(504, f"the answer took longer than {limits.timeout_s:g} s") from None
        finally:
            state["in_flight"] -= 1
        return JSONResponse(result, headers={"X-Image-Id": key})

    return app


def serve(model: str | None, host: str, port: int, limits: Limits, allowed_hosts: Iterable[str] = (),
          allowed_origins: Iterable[str] = (), device: str = "cpu") -> None:  # fmt: skip
    from perceive.perceiver import load

    perceiver = load(model, device)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: reachable from other machines", host)
    app = create_app(perceiver, limits, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    make_server(app, host, port, limits).run()
