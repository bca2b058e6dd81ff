"""Benchmark results side by side: the targets and referring DF1 by domain and by kind of expression,
from folders that ``retrieval_tiny.py --out`` (or ``perceive benchmark --out``) wrote.

    python benchmarks/compare_results.py benchmarks/results/tiny out/bench_a [...] [--labels shipped a ...]

Each kind's DF1 is a mean over a few dozen expressions, so the table gives the first folder's
number of expressions per kind and the bound on its standard error (folders written before the
benchmark counted expressions show "-"): between two runs, a kind's difference of under about
three standard errors can be the sample alone, before any difference between seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perceive.data.readers import FormatError, load_json
from perceive.eval.referring import standard_error_bound
from perceive.eval.report import fmt


def load(folder: Path) -> dict:
    try:
        return load_json(folder / "benchmark.json")
    except (FileNotFoundError, FormatError) as e:
        raise SystemExit(f"{e} (a folder that `retrieval_tiny.py --out` wrote)") from None


def compare(results: list[dict], labels: list[str]) -> str:
    """Markdown tables of ``results`` (benchmark.json objects), one column each, in order."""
    head = "| measure | " + " | ".join(labels) + " | target |"
    lines = ["## targets", "", head, "|---|" + "---|" * (len(labels) + 1)]
    for name, t in results[0]["targets"].items():
        cells = [fmt(r["targets"].get(name, {}).get("measured")) for r in results]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(t['target'])} |")
    lines += ["", "## referring DF1@0.5 by domain", "", "| domain | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    domains = [d for d in results[0]["humanref"] if d not in ("all", "rejection")]
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(fmt(r["humanref"].get(d, {}).get("DF1@0.5")) for r in results) + " |")
    counts = results[0].get("humanref_counts", {})
    lines += ["", "## referring DF1@0.5 by kind", "", "| kind | n | " + " | ".join(labels) + " | standard error <= |"]
    lines.append("|---|---|" + "---|" * (len(labels) + 1))
    for kind, v in results[0]["humanref_by_sub_domain"].items():
        n = counts.get(f"sub_domain:{kind}")
        cells = [fmt(r["humanref_by_sub_domain"].get(kind, {}).get("DF1@0.5")) for r in results]
        se = standard_error_bound(v["DF1@0.5"], n)
        lines.append(f"| {kind} | {n if n else '-'} | " + " | ".join(cells) + f" | {fmt(se)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--labels", nargs="+", default=None, help="one column name a folder (default: folder names)")
    args = ap.parse_args()
    labels = args.labels or [f.name for f in args.folders]
    if len(labels) != len(args.folders):
        raise SystemExit(f"{len(labels)} labels for {len(args.folders)} folders")
    sys.stdout.write(compare([load(f) for f in args.folders], labels))


if __name__ == "__main__":
    main()
