"""The card's PNG plots, drawn from the facts (``Facts.compute()``'s dict) with matplotlib.

One drawing function per plot, each returning its figure; ``write_plots`` draws those the facts
allow (a pool before ``label`` has no class or probability plots) and saves them byte-stable
(no timestamp or version in the PNG metadata).

    >>> write_plots({"status": {"success": 9, "failed_download": 1}}, Path("card"))  # doctest: +SKIP
    [PosixPath('card/ingest_status.png')]
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from silverlabel.dataset import atomic_write
from silverlabel.stages.card.facts import COYO_THRESHOLDS

PLOT_TITLES = {
    "class_frequency": "Class frequency",
    "top1_probability": "Top-1 probability",
    "labels_per_threshold": "Labels per image against threshold",
    "image_sizes": "Image sizes",
    "ingest_status": "Ingest statuses",
}
_STYLE = {"figure.figsize": (7, 4), "axes.grid": True, "grid.alpha": 0.3, "font.size": 9}


def _class_frequency(d: dict[str, Any], plt: Any) -> Any:
    counts = np.array([c["total"] for c in d["classes"]])
    fig, ax = plt.subplots()
    ranks = np.arange(1, len(counts) + 1)
    if len(counts) <= 200:
        ax.bar(ranks, counts, width=1.0, color="#4c72b0")
    else:
        ax.fill_between(ranks, counts, step="mid", color="#4c72b0", alpha=0.8)
    ax.set_yscale("log")
    head, tail = d["classes"][0], d["classes"][-1]
    ax.set(xlabel="class rank (largest first)", ylabel="samples (log)",
           title=f"{len(counts):,} classes: largest {head['name']} ({head['total']:,}), "
                 f"smallest {tail['name']} ({tail['total']:,})")
    return fig


def _top1_probability(d: dict[str, Any], plt: Any) -> Any:
    h = d["top1_hist"]
    fig, ax = plt.subplots()
    ax.hist(np.array(h["edges"][:-1]), bins=h["edges"], weights=h["counts"], color="#55a868")
    for t in COYO_THRESHOLDS:
        ax.axvline(t, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="top-1 probability", ylabel="images",
           title=f"Top-1 probability of {sum(h['counts']):,} images (mean {d['top1_mean']:.3f})")
    return fig


def _labels_per_threshold(d: dict[str, Any], plt: Any) -> Any:
    c = d["curve"]
    t = [r["threshold"] for r in c]
    fig, ax = plt.subplots()
    ax.plot(t, [r["avg_labels_per_image"] for r in c], "o-", color="#4c72b0", label="labels per image")
    ax.set(xlabel="probability threshold", ylabel="average labels per image")
    ax2 = ax.twinx()
    ax2.plot(t, [100 * r["share_with_label"] for r in c], "s--", color="#c44e52", label="images with >= 1 label")
    ax2.set_ylabel("% images with >= 1 label")
    ax2.set_ylim(0, 100)
    ax2.grid(False)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax.set_title("Labels per image against threshold")
    return fig


def _image_sizes(d: dict[str, Any], plt: Any) -> Any:
    s = d["sizes"]
    w, h, n = np.array(s["w"]), np.array(s["h"]), np.array(s["n"])
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 4))
    hi = max(2, int(max(w.max(), h.max())))
    bins = np.linspace(0, hi * 1.02, 41)
    _, _, _, im = a1.hist2d(w, h, bins=[bins, bins], weights=n, cmap="viridis", cmin=1)
    a1.set(xlabel="width (px)", ylabel="height (px)", title="stored width x height")
    fig.colorbar(im, ax=a1, label="images")
    short = np.minimum(w, h)
    a2.hist(short, bins=np.linspace(0, short.max() * 1.02 + 1, 41), weights=n, color="#8172b2")
    a2.set(xlabel="shorter side (px)", ylabel="images", title=f"shorter side (median {s['median_short_side']} px)")
    return fig


def _ingest_status(d: dict[str, Any], plt: Any) -> Any:
    st = d["status"]
    fig, ax = plt.subplots(figsize=(7, max(2.0, 0.45 * len(st) + 1)))
    names = list(st)[::-1]
    vals = [st[k] for k in names]
    ax.barh(names, vals, color=["#55a868" if k == "success" else "#c44e52" for k in names])
    total = sum(vals)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:,} ({100 * v / total:.1f}%)", va="center")
    ax.set_xscale("log")
    ax.set_xlim(0.8, max(vals) * 8)
    ax.set(xlabel="inputs (log)", title=f"Ingest statuses of {total:,} inputs")
    return fig


# plot name -> (the fact it needs, the function drawing it); in the order of PLOT_TITLES
_PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Any], Any]]] = {
    "class_frequency": ("classes", _class_frequency),
    "top1_probability": ("top1_hist", _top1_probability),
    "labels_per_threshold": ("curve", _labels_per_threshold),
    "image_sizes": ("sizes", _image_sizes),
    "ingest_status": ("status", _ingest_status),
}


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    with atomic_write(path) as f:
        f.write(buf.getvalue())


def write_plots(d: dict[str, Any], out: Path) -> list[Path]:
    """The PNG plots the facts allow, written into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with plt.rc_context(_STYLE):
        for name, (fact, draw) in _PLOTS.items():
            if not d.get(fact):
                continue
            fig = draw(d, plt)
            fig.tight_layout()
            _save(fig, out / f"{name}.png")
            plt.close(fig)
            written.append(out / f"{name}.png")
    return written
