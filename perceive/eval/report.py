"""Reports of evaluation results: a Markdown table for people, JSON for programs, plots to look at."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[object]]


@dataclass
class Report:
    name: str
    metrics: dict
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def fmt(v: object, percent: bool = True) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if percent else f"{v:.3f}"
    return str(v)


def markdown(report: Report) -> str:
    lines = [f"# {report.name}", ""]
    for t in report.tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in t.rows]
        lines.append("")
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def _bar_plot(path: Path, title: str, labels: Sequence[str], series: dict[str, Sequence[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 3.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], [100 * v for v in values], width, label=name)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_plot(path: Path, title: str, curves: dict[str, Sequence[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, ys in curves.items():
        ax.plot([i / (len(ys) - 1) for i in range(len(ys))], ys, label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: Report, out: str | Path, bars: dict | None = None, curves: dict | None = None) -> list[Path]:
    """``metrics.json``, ``report.md`` and any plots into ``out``; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json", out / "report.md"]
    (out / "metrics.json").write_text(json.dumps(report.metrics, indent=2) + "\n")
    text = markdown(report)
    if bars:
        _bar_plot(out / "bars.png", bars["title"], bars["labels"], bars["series"])
        text += "\n![bars](bars.png)\n"
        written.append(out / "bars.png")
    if curves:
        _curve_plot(out / "pr_curve.png", curves["title"], curves["curves"])
        text += "\n![precision-recall](pr_curve.png)\n"
        written.append(out / "pr_curve.png")
    (out / "report.md").write_text(text)
    return written
