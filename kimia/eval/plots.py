"""PNG plots of evaluation results (matplotlib, Agg backend: no display, safe on servers and in CI).

- `wer_by_subset.png`: corpus WER per subset, the overall bar last;
- `wer_by_length.png`: WER per utterance-length bucket (where people look first when long audio hurts);
- `confusion.png`: reference × predicted counts for choice/label tasks, row-normalised colours;
- `comparison.png`: several runs side by side (from `report.compare_runs`).
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["write_plots", "bar_plot", "confusion_plot", "comparison_plot"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def bar_plot(path: Path, names: list[str], values: list[float], *, ylabel: str, title: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.8 * len(names) + 2), 3.5))
    bars = ax.bar(range(len(names)), values, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_plot(path: Path, rows: list[str], cols: list[str], counts: list[list[int]], *, title: str) -> Path:
    plt = _pyplot()
    import numpy as np
    mat = np.asarray(counts, dtype=float)
    norm = mat / np.maximum(mat.sum(axis=1, keepdims=True), 1)
    size = max(3.5, 0.5 * max(len(rows), len(cols)) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(title)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if mat[i, j]:
                ax.text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(out_dir: Path, result: dict, extras: dict) -> list[Path]:
    """Every plot that fits the run's metric; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    perf = result["performance"]
    name = f"{result['model']} / {result['dataset']}"
    if result["eval_method"] == "wer":
        subs = [s for s in perf if s != "overall"] + ["overall"]
        written.append(bar_plot(out_dir / "wer_by_subset.png", subs, [perf[s]["wer"] for s in subs],
                                ylabel="WER %", title=f"WER by subset — {name}"))
        buckets = extras.get("length_buckets") or {}
        if buckets:
            written.append(bar_plot(out_dir / "wer_by_length.png", list(buckets),
                                    [b["wer"] for b in buckets.values()], ylabel="WER %",
                                    title=f"WER by utterance length — {name}"))
    if "confusion" in extras:
        rows, cols, counts = extras["confusion"]
        if rows:
            written.append(confusion_plot(out_dir / "confusion.png", rows, cols, counts,
                                          title=f"Confusion — {name}"))
    return written


def comparison_plot(path: Path, labels: list[str], rows: dict) -> Path:
    """Grouped bars: one group per (dataset/subset, metric), one bar per run."""
    plt = _pyplot()
    import numpy as np
    keys = sorted(rows)
    x = np.arange(len(keys))
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(keys) + 2), 3.8))
    for i, lab in enumerate(labels):
        vals = [rows[k][i] if rows[k][i] is not None else 0.0 for k in keys]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=lab)
    ax.set_xticks(x, [f"{k[0]}\n{k[1]}" for k in keys], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("Runs compared")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
