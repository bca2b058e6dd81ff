"""The server against slow and hostile clients (issue 41, items 3, 4 and 8): slow request heads and bodies,
more connections than the cap, chunked uploads past the limit, other sites' Host and Origin, guessable image
ids, and API docs that need the network. A fake perceiver answers instantly; the connection tests run a real
uvicorn server on 127.0.0.1 in a thread (the TestClient has no sockets)."""

import asyncio
import hashlib
import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from perceive.answer import Answer
from perceive.serve import connections as serve_connections
from perceive.serve.app import FORM_OVERHEAD, Limits, create_app
from perceive.serve.connections import make_server

QUESTION = "Please detect circle in this image. Answer the question with object indexes."


class FakePerceiver:
    """Encodes nothing and answers at once: the proposals are the boxes it was given, else the whole image."""

    def encode_batch(self, images, boxes=None):
        return [{"shape": np.asarray(im).shape, "boxes": boxes[i] if boxes else None} for i, im in enumerate(images)]

    def answer(self, encoded, questions):
        out = []
        for e, q in zip(encoded, questions, strict=True):
            h, w = e["shape"][:2]
            boxes = e["boxes"] or [[0, 0, w, h]]
            out.append(Answer(text=q, objects=[], proposals=[{"box": b, "score": 1.0} for b in boxes]))
        return out


def _png(size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _ask(client, headers=None, **data):
    files = {"image": ("s.png", _png(), "image/png")} if "image_id" not in data else None
    return client.post("/v1/ask", files=files, data={"question": QUESTION, **data}, headers=headers or {})


def test_image_ids_are_random_per_upload_and_follow_ups_still_work():
    client = TestClient(create_app(FakePerceiver()))
    first, second = _ask(client), _ask(client)
    a, b = first.headers["X-Image-Id"], second.headers["X-Image-Id"]
    assert first.status_code == second.status_code == 200
    assert a != b and len(a) >= 20  # the same picture twice: two unrelated ids
    content_hash = hashlib.sha256(_png()).hexdigest()[:32]
    assert content_hash not in (a, b)
    guess = client.post("/v1/ask", data={"image_id": content_hash, "question": QUESTION})
    assert guess.status_code == 404  # holding the image does not tell whether someone uploaded it
    for image_id in (a, b):
        again = client.post("/v1/ask", data={"image_id": image_id, "question": QUESTION})
        assert again.status_code == 200 and again.headers["X-Image-Id"] == image_id
    boxes = [[1, 2, 10, 12]]
    other = client.post("/v1/ask", data={"image_id": a, "question": QUESTION, "boxes": json.dumps(boxes)})
    assert other.status_code == 200 and [p["box"] for p in other.json()["proposals"]] == boxes
    derived = other.headers["X-Image-Id"]
    assert derived != a
    again = client.post("/v1/ask", data={"image_id": derived, "question": QUESTION})
    assert [p["box"] for p in again.json()["proposals"]] == boxes  # the follow-up keeps its boxes
    plain = client.post("/v1/ask", data={"image_id": a, "question": QUESTION})
    assert [p["box"] for p in plain.json()["proposals"]] == [[0, 0, 32, 32]]


@pytest.mark.parametrize("headers, status", [
    ({}, 200),
    ({"Host": "localhost:8000"}, 200),
    ({"Host": "127.0.0.1:8000"}, 200),
    ({"Host": "[::1]:8000"}, 200),
    ({"Host": "evil.example"}, 403),  # DNS rebinding: the attacker's name pointing at 127.0.0.1
    ({"Host": "evil.example:8000"}, 403),
    ({"Host": "localhost.evil.example"}, 403),
    ({"Origin": "http://testserver"}, 200),  # the server's own page
    ({"Origin": "http://evil.example"}, 403),  # a page the user visits posting to the local server
    ({"Origin": "https://testserver"}, 403),
    ({"Origin": "null"}, 403),
    ({"Host": "perceive.lan:9000", "Origin": "http://perceive.lan:9000"}, 200),  # --allowed-host
    ({"Origin": "https://perceive.example.org/"}, 200),  # --allowed-origin
])  # fmt: skip
def test_other_sites_host_and_origin_get_403(headers, status):
    app = create_app(FakePerceiver(), allowed_hosts=["perceive.lan"], allowed_origins=["https://perceive.example.org"])
    client = TestClient(app)
    r = _ask(client, headers)
    assert r.status_code == status, r.text
    health = client.get("/v1/health", headers=headers)
    assert health.status_code == status
    if status == 403:
        assert "--allowed-host" in r.json()["detail"] or "--allowed-origin" in r.json()["detail"]


def test_without_allowed_hosts_only_the_server_itself_is_served():
    client = TestClient(create_app(FakePerceiver()))
    assert client.get("/v1/health", headers={"Host": "perceive.lan"}).status_code == 403
    assert client.get("/v1/health", headers={"Origin": "https://perceive.example.org"}).status_code == 403
    anything = TestClient(create_app(FakePerceiver(), allowed_hosts=["*"], allowed_origins=["*"]))
    assert anything.get("/v1/health", headers={"Host": "a.b", "Origin": "http://c.d"}).status_code == 200


def test_the_api_docs_need_no_network():
    client = TestClient(create_app(FakePerceiver()))
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/ask" in page.text and "image_id" in page.text and "413" in page.text
    assert "://" not in page.text and "<script" not in page.text.lower()  # no CDN, no external anything
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/ask"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {"image", "image_id", "question", "boxes", "prompts"}
    assert client.get("/redoc").status_code == 404


async def _request(app, chunks):
    """One POST /v1/ask through the ASGI app with a chunked body from ``chunks`` (an async callable giving the
    next message); returns the response's status, headers and body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/ask", "raw_path": b"/v1/ask", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=xyz"),
                    (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 5000), "server": ("testserver", 80),
    }  # fmt: skip
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    await app(scope, chunks, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), json.loads(body)


def _call(app, chunks):
    return asyncio.run(_request(app, chunks))


def _form_pieces(size: int = 100) -> list[bytes]:
    """A valid multipart form (a question and a small PNG) cut into pieces of ``size`` bytes."""
    boundary = "xyz"
    form = (f'--{boundary}\r\nContent-Disposition: form-data; name="question"\r\n\r\n{QUESTION}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="s.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + _png() + f"\r\n--{boundary}--\r\n".encode()  # fmt: skip
    return [form[i : i + size] for i in range(0, len(form), size)]


def _trickle(pieces: list[bytes]):
    async def receive():
        body = pieces.pop(0)
        return {"type": "http.request", "body": body, "more_body": bool(pieces)}

    return receive


def test_a_chunked_upload_is_refused_as_soon_as_it_passes_the_limit():
    limit, chunk = 100_000, 16 * 1024
    app = create_app(FakePerceiver(), Limits(max_upload_bytes=limit))
    consumed = 0

    async def huge():  # a chunked upload of 50 times the limit
        nonlocal consumed
        consumed += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": consumed < 50 * limit}

    status, headers, body = _call(app, huge)
    assert status == 413 and "limit" in body["detail"]
    assert consumed <= limit + FORM_OVERHEAD + chunk  # read no further than the limit
    assert headers[b"connection"] == b"close"  # the rest is not read: the connection closes


def test_a_stalled_upload_gets_408():
    app = create_app(FakePerceiver(), Limits(body_timeout_s=0.3))
    calls = 0

    async def stalled():
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"--xyz\r\n", "more_body": True}
        await asyncio.sleep(30)
        return {"type": "http.request", "body": b"", "more_body": False}

    t0 = time.monotonic()
    status, headers, body = _call(app, stalled)
    assert status == 408 and "0.3 s" in body["detail"] and time.monotonic() - t0 < 5
    assert headers[b"connection"] == b"close"


def test_a_chunked_upload_within_the_limit_is_answered():
    status, _, body = _call(create_app(FakePerceiver()), _trickle(_form_pieces()))
    assert status == 200 and body["answer"] == QUESTION


def test_uploads_received_together_share_a_memory_budget():
    limit, chunk = 100_000, 50_000  # a budget of one upload (queue_size 1): 100 kB + the form's overhead
    app = create_app(FakePerceiver(), Limits(max_upload_bytes=limit, queue_size=1, body_timeout_s=0.5))

    async def both():
        held, calls = asyncio.Event(), 0

        async def holder():  # sends 100 kB, then stalls holding it
            nonlocal calls
            calls += 1
            if calls > 2:
                held.set()
                await asyncio.sleep(30)
            return {"type": "http.request", "body": b"x" * chunk, "more_body": True}

        async def another():
            await held.wait()
            return {"type": "http.request", "body": b"x" * chunk, "more_body": True}

        return await asyncio.gather(_request(app, holder), _request(app, another))

    (first, _, _), (second, headers, body) = asyncio.run(both())
    assert (first, second) == (408, 429) and "uploads at once" in body["detail"]
    assert headers[b"connection"] == b"close"
    status, _, _ = _call(app, _trickle(_form_pieces()))
    assert status == 200  # both released what they held


def test_the_connection_cap_fits_the_file_handle_limit(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1000, 1000))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: None)
    assert (
        serve_connections._file_handles_for(512)
        == 1000 - serve_connections.ACCEPT_BURST - serve_connections.FILE_HANDLE_RESERVE
    )
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 4096))
    assert serve_connections._file_handles_for(512) == 512  # the soft limit is raised instead


# --- a real server: connection deadlines and the connection cap -------------------------------------------

LIMITS = Limits(header_timeout_s=1.0, body_timeout_s=1.0, max_connections=8, max_upload_bytes=256 * 1024)


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server(create_app(FakePerceiver(), LIMITS), "127.0.0.1", port, LIMITS, log_level="warning")
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.02)
    yield port
    srv.should_exit = True
    thread.join(timeout=10)


def _connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        sock.sendall(data)
    return sock


def _closed_after(sock: socket.socket, t0: float, within: float) -> float | None:
    """Seconds from ``t0`` until the server closed ``sock`` (reading what it sent), None if not within ``within``."""
    sock.settimeout(max(0.01, t0 + within - time.monotonic()))
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def _health(port: int) -> int:
    with _connect(
        port, f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    ) as s:
        return int(s.recv(1024).split(b" ")[1])


@pytest.fixture
def server_log():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("perceive.serve", "uvicorn.error", "asyncio")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_half_sent_request_heads_are_closed_within_the_header_timeout(server, server_log):
    port = server
    half = f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
    t0 = time.monotonic()
    slow = [_connect(port, half) for _ in range(5)]
    trickler = _connect(port, b"G")
    for ch in b"ET /v1/health":  # a byte now and then must not extend the deadline
        time.sleep(0.05)
        trickler.send(bytes([ch]))
    assert _health(port) == 200  # answered meanwhile
    closed = [_closed_after(s, t0, LIMITS.header_timeout_s + 1) for s in [*slow, trickler]]
    assert all(c is not None and c >= LIMITS.header_timeout_s * 0.8 for c in closed), closed
    for s in [*slow, trickler]:
        s.close()
    dropped = [r for r in server_log if r.levelno >= logging.WARNING]
    assert len(dropped) <= 1  # one summary at most, not a line per connection


def test_more_connections_than_the_cap_close_the_oldest_waiting_ones(server):
    port = server
    t0 = time.monotonic()
    idle = [_connect(port) for _ in range(3 * LIMITS.max_connections)]
    assert _health(port) == 200  # a newcomer still gets in: the oldest waiting connection makes room
    early = [_closed_after(s, t0, 0.5) for s in idle[: 2 * LIMITS.max_connections]]
    assert all(c is not None for c in early), early
    for s in idle:
        s.close()
    time.sleep(0.2)
    # every connection in a request (here: sending a body), none waiting: a newcomer is refused with 503
    head = f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 9000\r\n\r\n--"
    busy = [_connect(port, head.encode()) for _ in range(LIMITS.max_connections)]
    time.sleep(0.1)
    with _connect(port) as newcomer:
        assert newcomer.recv(1024).startswith(b"HTTP/1.1 503")
    for s in busy:
        s.close()


def test_a_slow_body_gets_408_and_a_large_chunked_one_413(server):
    port = server
    head = (f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\n").encode()  # fmt: skip
    t0 = time.monotonic()
    with _connect(port, head + b"Content-Length: 5000\r\n\r\n--xyz\r\n") as sock:
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < LIMITS.body_timeout_s + 1
    chunk = b"x" * 65536
    sent, answer = 0, b""
    with _connect(port, head + b"Transfer-Encoding: chunked\r\n\r\n") as sock:
        sock.settimeout(0.01)
        while sent < 64 * 1024 * 1024 and not answer:
            try:
                sock.sendall(b"10000\r\n" + chunk + b"\r\n")
                sent += len(chunk)
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
        if not answer:
            sock.settimeout(2)
            answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert sent < 32 * 1024 * 1024  # refused long before the stream ended
