"""MVP-LM's two decoding thresholds against the benchmark's measures, to choose them on validation scenes.

    python benchmarks/mvp_thresholds.py --model out/mvp/model [--split validation] [--n 100] [--write]

Each question is decoded once; the benchmark (``perceive.eval.mvp_benchmark``) then runs at each
``referring_threshold`` (a sentence keeps every query above it) and each ``object_threshold`` (the panoptic merge's
and a word list's). Prints one table per threshold; ``--write`` stores the best of each (referring: the highest mean
of cIoU, gIoU, N-acc, REC Acc@0.5 and multi-target DF1; object: the highest PQ) in the model's ``config.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from perceive.data.sources.world import WorldSource
from perceive.eval import mvp_benchmark
from perceive.eval.benchmark import held_out_seed
from perceive.models.mvp.perceiver_mvp import MvpPerceiver
from perceive.perceiver import load
from perceive.world.generator import WorldConfig

REFERRING = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
OBJECT = (0.3, 0.4, 0.5, 0.6, 0.7)
REFERRING_MEASURES = ("referring cIoU", "referring gIoU", "N-acc", "REC Acc@0.5", "multi-target DF1@0.5")


class CachedDecoding:
    """A perceiver whose encodings and decodings are computed once: the thresholds act only after them."""

    def __init__(self, perceiver: MvpPerceiver) -> None:
        self.perceiver = perceiver
        self.encoded: dict[str, list] = {}
        self.decoded: dict[tuple, object] = {}

    def encode_batch(self, images: list) -> list:
        key = hashlib.sha1(b"".join(im.tobytes() for im in images)).hexdigest()
        if key not in self.encoded:
            self.encoded[key] = self.perceiver.encode_batch(images)
        return self.encoded[key]

    def decode(self, encoded, instruction):
        key = (id(encoded), instruction)
        if key not in self.decoded:
            self.decoded[key] = self.perceiver.decode(encoded, instruction)
        return self.decoded[key]

    def __getattr__(self, name: str):
        return getattr(self.perceiver, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--write", action="store_true", help="store the best thresholds in the model's config.json")
    args = parser.parse_args()
    perceiver = load(args.model)
    assert isinstance(perceiver, MvpPerceiver), f"{args.model} is not an MVP-LM model"
    source = WorldSource(WorldConfig(size=256, person_share=0.35, relation_depth=2), masks=True)
    first = held_out_seed(args.split, args.n)
    records = [source.record(first + i) for i in range(args.n)]
    cached = CachedDecoding(perceiver)
    config = perceiver.config
    default_referring, default_object = config.referring_threshold, config.object_threshold

    def measure(referring: float, obj: float) -> dict:
        config.referring_threshold, config.object_threshold = referring, obj
        return mvp_benchmark.run(cached, records, progress=False).metrics  # type: ignore[arg-type]

    print(f"{args.n} {args.split} scenes; thresholds: referring {default_referring}, object {default_object}\n")
    print("| referring threshold | " + " | ".join(REFERRING_MEASURES) + " | mean |")
    print("|---" * (len(REFERRING_MEASURES) + 2) + "|")
    by_referring = {}
    for t in REFERRING:
        m = measure(t, default_object)
        values = [m[k] or 0.0 for k in REFERRING_MEASURES]
        by_referring[t] = sum(values) / len(values)
        print(f"| {t} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | {100 * by_referring[t]:.1f} |")
    best_referring = max(by_referring, key=lambda t: by_referring[t])
    print("\n| object threshold | PQ | PQ things | PQ stuff | mIoU | mask AP | box AP |")
    print("|---|---|---|---|---|---|---|")
    by_object = {}
    for t in OBJECT:
        m = measure(best_referring, t)
        by_object[t] = m["PQ"]
        cells = [m[k] for k in ("PQ", "PQ things", "PQ stuff", "mIoU", "mask AP", "box AP")]
        print(f"| {t} | " + " | ".join(f"{100 * v:.1f}" for v in cells) + " |")
    best_object = max(by_object, key=lambda t: by_object[t])
    print(f"\nbest on {args.split}: referring_threshold {best_referring}, object_threshold {best_object}")
    if args.write:
        path = Path(args.model) / "config.json"
        raw = json.loads(path.read_text())
        raw.update(referring_threshold=best_referring, object_threshold=best_object)
        path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        print(f"wrote both into {path}")


if __name__ == "__main__":
    main()
