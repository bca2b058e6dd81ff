"""Slow and hostile clients against a live ``perceive serve`` on 127.0.0.1 (issue 41), with bounded counts and time.

    python benchmarks/adversarial.py [--quick] [--model DIR] [--header-timeout 10] [--body-timeout 10]

Starts the server in a child process (a fake model that takes 0.1 s an answer, or ``--model``), then runs:
a flood of concurrent requests (429s, no 5xx); connections that send half a request head, and ones that
trickle it a byte a second (each closed within the header timeout, the health check answering meanwhile);
more connections than the cap (the server's file handles stay bounded); uploads that stall (408); chunked
uploads far over the size limit (413, bounded temporary disk and memory); other sites' Host and Origin (403),
guessable image ids and the offline API docs. While a probe runs, the child's open file handles, memory and
temporary files (open ones, deleted or not, under its private TMPDIR) are sampled every 50 ms (2 ms while an
upload is spooled), and its log's growth is measured. Prints a Markdown table: probe, expected, observed.
``--quick`` uses small counts. A run takes under a minute, mostly waiting for the timeouts; it exits 1 if a
probe fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import os
import platform
import resource
import select
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from perceive.serve.connections import ACCEPT_BURST, FILE_HANDLE_RESERVE

QUESTION = "Please detect circle; person in this image. Answer the question with object indexes."
FULL = {"flood": 200, "half_heads": 400, "tricklers": 50, "connections": 5000, "slow_bodies": 20, "uploads": 5,
        "upload_mb": 200}  # fmt: skip
QUICK = {"flood": 40, "half_heads": 40, "tricklers": 10, "connections": 600, "slow_bodies": 5, "uploads": 2,
         "upload_mb": 50}  # fmt: skip


class FakePerceiver:
    """Answers after ``delay`` seconds, as if it ran a model: the proposals are the given boxes or the image."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def encode_batch(self, images, boxes=None):
        return [{"shape": np.asarray(im).shape, "boxes": boxes[i] if boxes else None} for i, im in enumerate(images)]

    def answer(self, encoded, questions):
        from perceive.answer import Answer

        time.sleep(self.delay)
        out = []
        for e, q in zip(encoded, questions, strict=True):
            h, w = e["shape"][:2]
            out.append(Answer(text=q, objects=[], proposals=[{"box": b, "score": 1.0} for b in e["boxes"] or
                                                             [[0, 0, w, h]]]))  # fmt: skip
        return out


def run_server(args: argparse.Namespace) -> None:
    """The child process: the server with the limits of the command line."""
    from perceive.serve.app import Limits, create_app
    from perceive.serve.connections import make_server

    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), queue_size=args.queue,
                    header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                    max_connections=args.max_connections)  # fmt: skip
    if args.model:
        from perceive.perceiver import load

        perceiver = load(args.model)
    else:
        perceiver = FakePerceiver(0.1)
    make_server(create_app(perceiver, limits), "127.0.0.1", args.port, limits).run()


class Watch:
    """Samples the server process every 50 ms: open file handles, resident memory, and the bytes of its open
    files under its TMPDIR (spooled uploads are deleted files that only their handle still shows)."""

    def __init__(self, pid: int, tmpdir: str, every_s: float = 0.05) -> None:
        self.pid, self.tmpdir, self.every_s = pid, tmpdir, every_s
        self.peak: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> dict[str, int]:
        fds, tmp = 0, 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            fds += 1
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith(self.tmpdir):
                    tmp += os.stat(f"/proc/{self.pid}/fd/{fd}").st_size
            except OSError:  # closed meanwhile
                pass
        rss = 0
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return {"fds": fds, "tmp": tmp, "rss": rss}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for k, v in self.sample().items():
                    self.peak[k] = max(self.peak[k], v)
            except (OSError, ValueError):
                return
            time.sleep(self.every_s)

    def __enter__(self) -> Watch:
        self.before = self.sample()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def png(seed: int, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class Health:
    """Asks /v1/health every half second on a fresh connection while a probe runs."""

    def __init__(self, base: str) -> None:
        self.base, self.results, self.stop = base, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            t0 = time.monotonic()
            try:
                status = httpx.get(f"{self.base}/v1/health", timeout=5).status_code
            except httpx.HTTPError as e:
                status = type(e).__name__
            self.results.append((status, time.monotonic() - t0))

    def __enter__(self) -> Health:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    def summary(self) -> tuple[bool, str]:
        ok = bool(self.results) and all(s == 200 for s, _ in self.results)
        slowest = max((t for _, t in self.results), default=0.0)
        codes = Counter(str(s) for s, _ in self.results)
        return ok, f"health {dict(codes)}, slowest {slowest * 1000:.0f} ms"


def wait_closed(socks: list[socket.socket], opened: list[float], deadline: float) -> list[float | None]:
    """Seconds from each socket's opening until the server closed it (None: still open at ``deadline``)."""
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    closed: list[float | None] = [None] * len(socks)
    left = len(socks)
    while left and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=max(0.0, min(0.2, deadline - time.monotonic()))):
            try:
                if key.fileobj.recv(65536):  # type: ignore[union-attr]
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            closed[key.data] = time.monotonic() - opened[key.data]
            sel.unregister(key.fileobj)
            left -= 1
    sel.close()
    for s in socks:
        s.close()
    return closed


def open_many(port: int, n: int, data: bytes) -> tuple[list[socket.socket], list[float]]:
    socks, opened = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        with contextlib.suppress(OSError):  # already closed by the server (over the cap): wait_closed sees it
            s.sendall(data)
        socks.append(s)
        opened.append(time.monotonic())
    return socks, opened


def status_of(answer: bytes) -> str:
    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/") else "no answer"


def frame(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


MEGABYTE = os.urandom(2**20)


def chunked_upload(port: int, total: int, finish: bool = False) -> tuple[str, int]:
    """Posts a form whose image is ``total`` random bytes, chunked a megabyte at a time, stopping as soon as the
    server answers; ``finish`` ends the form (with a question) when all is sent. Returns the status and the bytes
    sent."""
    head = (f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary=xyz"
            "\r\nTransfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip
    part = (
        b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    end = b'\r\n--xyz\r\nContent-Disposition: form-data; name="question"\r\n\r\nhi\r\n--xyz--\r\n'
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(OSError):  # the server closes the connection after a 413
            s.sendall(head + frame(part))
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(frame(MEGABYTE[: total - sent]))
                sent += min(len(MEGABYTE), total - sent)
            if finish and not select.select([s], [], [], 0)[0]:
                s.sendall(frame(end) + b"0\r\n\r\n")
        with contextlib.suppress(OSError):
            answer = s.recv(65536)
    return status_of(answer), sent


class Bench:
    def __init__(self, args: argparse.Namespace, port: int, proc: subprocess.Popen, tmpdir: str, log: Path) -> None:
        self.args, self.port, self.proc, self.tmpdir, self.log = args, port, proc, tmpdir, log
        self.base = f"http://127.0.0.1:{port}"
        self.rows: list[tuple[str, str, str, bool]] = []

    def row(self, probe: str, expected: str, observed: str, ok: bool) -> None:
        self.rows.append((probe, expected, observed, ok))
        print(f"  {'ok  ' if ok else 'FAIL'} {probe}: {observed}", file=sys.stderr, flush=True)

    def watch(self, every_s: float = 0.05) -> Watch:
        return Watch(self.proc.pid, self.tmpdir, every_s)

    def flood(self, n: int) -> None:
        images = [png(i) for i in range(n)]

        async def go() -> Counter[int | str]:
            async with httpx.AsyncClient(base_url=self.base, timeout=60,
                                         limits=httpx.Limits(max_connections=n)) as client:  # fmt: skip

                async def one(i: int) -> int | str:
                    try:
                        r = await client.post("/v1/ask", files={"image": ("s.png", images[i], "image/png")},
                                              data={"question": QUESTION})  # fmt: skip
                        return r.status_code
                    except httpx.HTTPError as e:
                        return type(e).__name__

                return Counter(await asyncio.gather(*(one(i) for i in range(n))))

        t0 = time.monotonic()
        with self.watch() as w:
            codes = asyncio.run(go())
        ok = set(codes) <= {200, 429} and codes[429] > 0 and httpx.get(f"{self.base}/v1/health").status_code == 200
        self.row(f"flood: {n} concurrent asks", "200 or 429 each, no 5xx, health 200 after",
                 f"{dict(sorted(codes.items(), key=str))} in {time.monotonic() - t0:.1f} s; "
                 f"memory peak {w.peak['rss'] / 2**20:.0f} MB", ok)  # fmt: skip

    def slow_heads(self, n_half: int, n_trickle: int) -> None:
        t = self.args.header_timeout
        half = f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: multipart/form".encode()
        log0 = self.log.stat().st_size
        with self.watch() as w, Health(self.base) as h:
            socks, opened = open_many(self.port, n_half, half)
            trick, trick_opened = open_many(self.port, n_trickle, b"G")
            stop = threading.Event()

            def trickle() -> None:  # a byte a second: each would keep a timer that restarted on data alive
                for ch in b"ET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                    if stop.wait(1.0):
                        return
                    for s in trick:
                        with contextlib.suppress(OSError):
                            s.send(bytes([ch]))

            tr = threading.Thread(target=trickle, daemon=True)
            tr.start()
            closed = wait_closed(socks + trick, opened + trick_opened, time.monotonic() + t + 5)
            stop.set()
            tr.join()
        ok_h, health = h.summary()
        done = [c for c in closed if c is not None]
        worst, median = max(done, default=float("nan")), statistics.median(done) if done else float("nan")
        ok = len(done) == len(closed) and worst <= t + 1 and ok_h
        self.row(f"slow heads: {n_half} half request heads + {n_trickle} sent a byte a second",
                 f"each closed within the header timeout + 1 s ({t + 1:g} s); health 200 meanwhile",
                 f"{len(done)}/{len(closed)} closed, after {median:.1f} s (median), {worst:.1f} s "
                 f"(max); {health}; server file handles peak {w.peak['fds']}; log +{self.log.stat().st_size - log0} B",
                 ok)  # fmt: skip

    def over_cap(self, n: int) -> None:
        t, cap = self.args.header_timeout, self.args.max_connections
        half = f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n".encode()
        log0 = self.log.stat().st_size
        with self.watch() as w, Health(self.base) as h:
            socks, opened = open_many(self.port, n, half)
            closed = wait_closed(socks, opened, max(opened) + t + 30)
        ok_h, health = h.summary()
        # connections the server has not accepted yet wait in the kernel (no handle, no timer): the last ones to
        # get in close a header timeout after that, so "within" is counted from the last one opened
        last = max((o + c for o, c in zip(opened, closed, strict=True) if c is not None), default=float("nan"))
        after = last - max(opened)
        done = sum(c is not None for c in closed)
        grew = self.log.stat().st_size - log0
        bound = cap + ACCEPT_BURST + FILE_HANDLE_RESERVE
        ok = done == n and after <= t + 30 and w.peak["fds"] <= bound and ok_h and grew < 10_000
        self.row(f"connection flood: {n} half heads, cap {cap}",
                 f"server file handles <= {bound} (cap + accept burst + reserve); all closed within {t + 30:g} s of "
                 "the last one; health 200; log < 10 kB",
                 f"server file handles peak {w.peak['fds']} (before {w.before['fds']}); {done}/{n} closed, the last "
                 f"{after:.1f} s after the last was opened; {health}; log +{grew} B", ok)  # fmt: skip

    def slow_bodies(self, n: int) -> None:
        t = self.args.body_timeout
        head = (f"POST /v1/ask HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: multipart/form-data; "
                "boundary=xyz\r\nContent-Length: 1000000\r\n\r\n--xyz\r\n").encode()  # fmt: skip
        socks, opened = open_many(self.port, n, head)
        answers: list[bytes] = []
        deadline = time.monotonic() + t + 5
        for s in socks:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                answers.append(s.recv(65536))
            except OSError:
                answers.append(b"")
        took = time.monotonic() - min(opened)
        for s in socks:
            s.close()
        codes = Counter(status_of(a) for a in answers)
        ok = codes == Counter({"408": n}) and took <= t + 1
        self.row(f"slow bodies: {n} uploads that stall after 7 bytes", f"408 each within the body timeout + 1 s "
                 f"({t + 1:g} s)", f"{dict(codes)}, the last after {took:.1f} s", ok)  # fmt: skip

    def chunked(self, n: int, mb: int) -> None:
        limit = self.args.max_upload_mb
        results: list[tuple[str, int]] = []
        log0 = self.log.stat().st_size
        with self.watch() as w:
            threads = [threading.Thread(target=lambda: results.append(chunked_upload(self.port, mb * 2**20)))
                       for _ in range(n)]  # fmt: skip
            for th in threads:
                th.start()
            for th in threads:
                th.join()
        codes = Counter(status for status, _ in results)
        sent = max(sent for _, sent in results) / 2**20
        grew_mb = (w.peak["rss"] - w.before["rss"]) / 2**20
        ok = codes == Counter({"413": n}) and w.peak["tmp"] == 0 and grew_mb <= n * 3 * limit
        self.row(f"chunked uploads: {n} at once of {mb} MB each, limit {limit:g} MB",
                 f"413 each, no temporary file; server memory growth <= {n} x 3 x limit",
                 f"{dict(codes)}; at most {sent:.0f} MB sent before the answer; temporary files peak "
                 f"{w.peak['tmp'] / 2**20:.1f} MB; memory +{grew_mb:.0f} MB; log +{self.log.stat().st_size - log0} B",
                 ok)  # fmt: skip
        with self.watch(every_s=0.002) as w:  # the spooled file lives only while the form is read
            status, _ = chunked_upload(self.port, int((limit - 1) * 2**20), finish=True)
        ok = status == "400" and w.peak["tmp"] <= limit * 2**20
        self.row(f"chunked upload of {limit - 1:g} MB that is not an image",
                 "400 (not an image); temporary files under the limit",
                 f"{status}; temporary files peak {w.peak['tmp'] / 2**20:.1f} MB", ok)  # fmt: skip

    def cross_site(self) -> None:
        url, own = f"{self.base}/v1/ask", f"http://127.0.0.1:{self.port}"
        files = {"image": ("s.png", png(1), "image/png")}
        cases = [
            ("Host of a rebinding name", {"Host": f"attacker.example:{self.port}"}, 403),
            ("Origin of another site", {"Origin": "http://attacker.example"}, 403),
            ("Origin null (sandboxed page)", {"Origin": "null"}, 403),
            ("the server's own page", {"Origin": own}, 200),
        ]
        observed, ok = [], True
        for name, headers, want in cases:
            r = httpx.post(url, files=files, data={"question": QUESTION}, headers=headers, timeout=30)
            observed.append(f"{name} {r.status_code}")
            ok &= r.status_code == want
        read = httpx.get(f"{self.base}/v1/health", headers={"Host": "attacker.example"}).status_code
        observed.append(f"rebinding read of /v1/health {read}")
        ok &= read == 403
        self.row("Host / Origin tricks", "403, except the server's own page (200)", "; ".join(observed), ok)
        a, b = (httpx.post(url, files=files, data={"question": QUESTION}, timeout=30) for _ in range(2))
        guess = hashlib.sha256(png(1)).hexdigest()[:32]
        g = httpx.post(url, data={"image_id": guess, "question": QUESTION}, timeout=30).status_code
        follow = httpx.post(url, data={"image_id": a.headers["X-Image-Id"], "question": QUESTION}, timeout=30)
        ids = (a.headers["X-Image-Id"], b.headers["X-Image-Id"])
        ok = ids[0] != ids[1] and g == 404 and follow.status_code == 200
        self.row("image ids", "a new random id per upload; the image's hash is no id (404); follow-ups 200",
                 f"same image twice: {'different' if ids[0] != ids[1] else 'SAME'} ids of {len(ids[0])} characters; "
                 f"hash as id {g}; follow-up {follow.status_code}", ok)  # fmt: skip
        docs = httpx.get(f"{self.base}/docs").text
        ok = "/v1/ask" in docs and "://" not in docs and "<script" not in docs
        observed = f"{len(docs)} B; external URLs: {docs.count('://')}; scripts: {docs.count('<script')}"
        self.row("/docs offline", "the API described, no script, no external URL", observed, ok)


def machine() -> str:
    name = platform.processor() or "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return f"{name}, {os.cpu_count()} cores, load average {load} at the start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a check that it runs)")
    ap.add_argument("--model", default=None, help="a model folder (default: a fake model, 0.1 s an answer)")
    ap.add_argument("--header-timeout", type=float, default=10.0, help="the server's --header-timeout")
    ap.add_argument("--body-timeout", type=float, default=10.0, help="the server's --body-timeout")
    ap.add_argument("--max-connections", type=int, default=512, help="the server's --max-connections")
    ap.add_argument("--max-upload-mb", type=float, default=10.0, help="the server's --max-upload-mb")
    ap.add_argument("--queue", type=int, default=8, help="the server's --queue")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        run_server(args)
        return
    counts = QUICK if args.quick else FULL
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the flood's sockets are this process's files too
    need = counts["connections"] + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        counts = {**counts, "connections": min(need, hard) - 256}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="perceive-adversarial-"))
    (work / "tmp").mkdir()
    log = work / "server.log"
    flags = ["--header-timeout", str(args.header_timeout), "--body-timeout", str(args.body_timeout),
             "--max-connections", str(args.max_connections), "--max-upload-mb", str(args.max_upload_mb),
             "--queue", str(args.queue)]  # fmt: skip
    cmd = [sys.executable, __file__, "--serve", "--port", str(port), *flags, *(["--model", args.model] if args.model
                                                                              else [])]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(work / "tmp")}
    started, where = time.monotonic(), machine()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit(f"the server did not start; its log: {log}")
        bench = Bench(args, port, proc, str(work / "tmp"), log)
        print(f"machine: {where}", file=sys.stderr)
        bench.flood(counts["flood"])
        bench.cross_site()
        bench.slow_heads(counts["half_heads"], counts["tricklers"])
        bench.over_cap(counts["connections"])
        bench.slow_bodies(counts["slow_bodies"])
        bench.chunked(counts["uploads"], counts["upload_mb"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model = args.model or "a fake model (0.1 s an answer)"
    print(
        f"\nServer: `perceive serve` limits {' '.join(flags)}, {model}; machine: {where}; "
        f"run took {time.monotonic() - started:.0f} s; server log {log.stat().st_size} B in all.\n"
    )
    print("| probe | expected | observed | |\n|---|---|---|---|")
    for probe, expected, observed, ok in bench.rows:
        print(f"| {probe} | {expected} | {observed} | {'ok' if ok else '**FAIL**'} |")
    if not all(r[3] for r in bench.rows):
        raise SystemExit(f"a probe failed; the server's log: {log}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
