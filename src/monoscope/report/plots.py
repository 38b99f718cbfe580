"""Small plotting helpers shared by the feature browser and the report.

Two kinds of output:

- ``svg_histogram`` / ``svg_bars`` write a tiny inline SVG string in pure Python (no matplotlib), fast
  enough to draw one per feature page for thousands of features. Every number is formatted by us and every
  label is XML-escaped, so the SVG can be placed straight into an HTML page.
- ``figure_png`` / ``histogram_png`` / ``line_png`` / ``bar_png`` draw with matplotlib's Agg backend (no
  display needed) and either write a PNG file or return a ``data:image/png;base64,...`` URI for inline use.
"""
from __future__ import annotations

import base64
import io
import math
from html import escape
from pathlib import Path
from typing import Sequence

from monoscope.artifacts import atomic_path
from monoscope.report.formatting import number as _fmt

ACCENT = "#d9480f"
MUTED = "#868e96"
GRID = "#e9ecef"


# ------------------------------------------------------------------------------------------ inline SVG
def svg_histogram(counts: Sequence[float], edges: Sequence[float], *, width: int = 520, height: int = 160,
                  color: str = ACCENT, xlabel: str = "", log_counts: bool = False,
                  marker: float | None = None, x_is_log10: bool = False) -> str:
    """An inline SVG bar chart of a histogram (``len(edges) == len(counts) + 1``).

    ``log_counts`` draws log10(1 + count) heights, which keeps the long tail of activation histograms
    visible. ``marker`` draws a thin vertical line at that x value (e.g. the mean). ``x_is_log10``: the
    edges are log10 values (log-spaced bins); tick labels then show 10**x.
    """
    counts = [max(0.0, float(c)) for c in counts]
    edges = [float(e) for e in edges]
    if not counts or len(edges) != len(counts) + 1:
        return '<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="0" height="0"></svg>'
    pad_l, pad_r, pad_t, pad_b = 44, 10, 8, 34 if xlabel else 22
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    heights = [math.log10(1 + c) if log_counts else c for c in counts]
    top = max(heights) or 1.0
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    sx = lambda v: pad_l + (v - lo) / span * w  # noqa: E731
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img">']
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="{MUTED}"/>')
    for frac in (0.5, 1.0):
        y = pad_t + h - frac * h
        parts.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}" stroke="{GRID}"/>')
        label = _fmt(10 ** (frac * top) - 1) if log_counts else _fmt(frac * top)
        parts.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for c, hgt, a, b in zip(counts, heights, edges[:-1], edges[1:]):
        if c <= 0:
            continue
        x0, x1 = sx(a), sx(b)
        bh = hgt / top * h
        ta, tb = (10 ** a, 10 ** b) if x_is_log10 else (a, b)
        parts.append(f'<rect x="{x0:.1f}" y="{pad_t + h - bh:.1f}" width="{max(0.5, x1 - x0 - 0.6):.1f}" '
                     f'height="{bh:.1f}" fill="{color}"><title>{_fmt(ta)} – {_fmt(tb)}: {int(round(c))}</title></rect>')
    if x_is_log10:
        ticks = [float(t) for t in range(math.ceil(lo), math.floor(hi) + 1)]
        if len(ticks) < 2:
            ticks = [lo, hi]
        if len(ticks) > 8:
            ticks = ticks[::math.ceil(len(ticks) / 8)]
    else:
        ticks = [lo, (lo + hi) / 2, hi]
    for v in ticks:
        label = _fmt(10 ** v) if x_is_log10 else _fmt(v)
        parts.append(f'<text x="{sx(v):.1f}" y="{pad_t + h + 14}" text-anchor="middle" class="tick">{label}</text>')
    if marker is not None and lo <= marker <= hi:
        parts.append(f'<line x1="{sx(marker):.1f}" y1="{pad_t}" x2="{sx(marker):.1f}" y2="{pad_t + h}" '
                     f'stroke="#212529" stroke-dasharray="3 3"/>')
    if xlabel:
        parts.append(f'<text x="{pad_l + w / 2:.1f}" y="{height - 4}" text-anchor="middle" class="axis">'
                     f'{escape(xlabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(labels: Sequence[str], values: Sequence[float], *, width: int = 320, bar_height: int = 16,
             color: str = ACCENT, negative_color: str = "#1c7ed6") -> str:
    """Horizontal bars with (escaped) labels, for small ranked lists such as logit effects."""
    if not values:
        return ""
    label_w, pad = 110, 4
    vmax = max(abs(float(v)) for v in values) or 1.0
    height = len(values) * (bar_height + pad) + pad
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img">']
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = pad + i * (bar_height + pad)
        bw = abs(float(v)) / vmax * (width - label_w - 50)
        fill = color if v >= 0 else negative_color
        parts.append(f'<text x="{label_w - 6}" y="{y + bar_height - 4}" text-anchor="end" class="tick">'
                     f'{escape(str(lab))}</text>')
        parts.append(f'<rect x="{label_w}" y="{y}" width="{bw:.1f}" height="{bar_height}" fill="{fill}"/>')
        parts.append(f'<text x="{label_w + bw + 4:.1f}" y="{y + bar_height - 4}" class="tick">{_fmt(float(v))}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------------------ matplotlib
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig, path: str | Path | None = None, dpi: int = 120) -> str:
    """Save a matplotlib figure as PNG (atomically) to ``path``, or return it as a data URI; closes it."""
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is None:
        return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return str(path)


def _axes(figsize=(5.0, 3.0), title: str = "", xlabel: str = "", ylabel: str = ""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(alpha=0.3)
    return fig, ax


def histogram_png(values, path: str | Path | None = None, *, bins: int = 50, title: str = "", xlabel: str = "",
                  log_y: bool = False, log_x: bool = False) -> str:
    """Histogram of raw values (``log_x`` bins log10 of the positive values)."""
    import numpy as np

    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    if log_x:
        v = np.log10(v[v > 0])
        xlabel = xlabel or "log10 value"
    fig, ax = _axes(title=title, xlabel=xlabel, ylabel="count")
    if v.size:
        ax.hist(v, bins=bins, color=ACCENT, alpha=0.85)
    if log_y:
        ax.set_yscale("log")
    return figure_png(fig, path)


def line_png(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path | None = None, *,
             title: str = "", xlabel: str = "", ylabel: str = "", log_x: bool = False, log_y: bool = False,
             markers: bool = True) -> str:
    """One line per ``{label: (xs, ys)}`` with a legend."""
    fig, ax = _axes(title=title, xlabel=xlabel, ylabel=ylabel)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, ms=3, label=str(label))
    if log_x:
        ax.set_xscale("log")
        ticks = sorted({float(x) for xs, _ in series.values() for x in xs if float(x) > 0})
        if 0 < len(ticks) <= 12:  # the measured points as plain numbers, not powers of ten
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    if log_y:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend(fontsize=8, frameon=False)
    return figure_png(fig, path)


def bar_png(labels: Sequence[str], values: Sequence[float], path: str | Path | None = None, *, title: str = "",
            xlabel: str = "", horizontal: bool = True) -> str:
    """A bar chart of labelled values (horizontal by default, largest first as given)."""
    fig, ax = _axes(figsize=(5.0, max(2.0, 0.28 * len(values) + 0.8)) if horizontal else (5.0, 3.0),
                    title=title, xlabel=xlabel if horizontal else "", ylabel="" if horizontal else xlabel)
    labels = [str(x) for x in labels]
    if horizontal:
        ax.barh(range(len(values))[::-1], list(values), color=ACCENT)
        ax.set_yticks(range(len(values))[::-1], labels)
    else:
        ax.bar(range(len(values)), list(values), color=ACCENT)
        ax.set_xticks(range(len(values)), labels, rotation=45, ha="right")
    return figure_png(fig, path)
