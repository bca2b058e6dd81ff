"""The server under load on loopback, and what a follow-up question saves.

    python benchmarks/serve_load.py [--model checkpoints/tiny] [--clients 1 4 8] [--requests 24]

Starts ``perceive serve``'s app in this process on 127.0.0.1, then (1) sends first questions about
distinct images from several concurrent clients and reports requests per second and latency, and
(2) for a set of images, times the first question (proposals, vision encoders, language model)
against the same question asked again by ``image_id`` (language model only), as medians and their ratio.
"""

from __future__ import annotations

import argparse
import io
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import uvicorn
from PIL import Image

from perceive.models.chatrex.perceiver_chatrex import ChatRexPerceiver
from perceive.serve.app import Limits, create_app
from perceive.world.generator import WorldConfig, generate_scene

QUESTION = "Please detect circle; person in this image. Answer the question with object indexes."


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(generate_scene(50_000 + seed, WorldConfig(size=256, person_share=0.4)).image).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=24)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ChatRexPerceiver.from_pretrained(args.model), Limits(queue_size=64, timeout_s=600))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/ask"
    images = [png(i) for i in range(args.requests * len(args.clients))]  # a new image for every request
    fresh = [png(10_000 + i) for i in range(12)]  # never sent during the load phase, so never cached

    def first(i: int, pool: list[bytes] = images) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = httpx.post(url, files={"image": ("s.png", pool[i], "image/png")}, data={"question": QUESTION},
                       timeout=600)  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t0, r.headers["X-Image-Id"]

    print("| clients | requests | requests/s | median latency (s) | p90 latency (s) |\n|---|---|---|---|---|")
    for r, c in enumerate(args.clients):
        idx = list(range(r * args.requests, (r + 1) * args.requests))
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            lat = [x for x, _ in pool.map(first, idx)]
        wall = time.perf_counter() - t0
        lat.sort()
        print(f"| {c} | {len(idx)} | {len(idx) / wall:.2f} | {statistics.median(lat):.3f} | "
              f"{lat[int(0.9 * (len(lat) - 1))]:.3f} |")  # fmt: skip

    firsts, follows = [], []
    for i in range(len(fresh)):
        t, key = first(i, fresh)
        firsts.append(t)
        t0 = time.perf_counter()
        # the same question again, by image_id: only the reuse of the encoded image differs
        httpx.post(url, data={"image_id": key, "question": QUESTION}, timeout=600).raise_for_status()
        follows.append(time.perf_counter() - t0)
    f, u = statistics.median(firsts), statistics.median(follows)
    print("\n| question | median latency (s) |\n|---|---|")
    print(
        f"| first (upload, proposals, encoders, answer) | {f:.3f} |\n| follow-up by image_id (answer only) | {u:.3f} |"
    )
    print(f"\nfollow-up / first: {u / f:.2f}")
    server.should_exit = True


if __name__ == "__main__":
    main()
