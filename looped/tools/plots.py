"""Figures written by training and evaluation (matplotlib, headless).

matplotlib is imported at the first figure, not with this module: every `looped` command and
`train.py` import this file, and most of their runs (a --help, a failing config) draw nothing."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_loops(curves: dict[str, dict[int, float]], path: Path, *,
                         ylabel: str = "held-out accuracy", trained_loop: int | None = None,
                         title: str = "") -> Path:
    """One line per run: metric against loop count R (log2 x axis)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for label, curve in curves.items():
        xs = sorted(curve)
        ax.plot(xs, [curve[x] for x in xs], marker="o", label=label)
    if trained_loop is not None:
        ax.axvline(trained_loop, color="grey", linestyle="--", linewidth=1,
                   label=f"trained R={trained_loop}")
    _log2_loop_axis(ax, {x for curve in curves.values() for x in curve})
    return _finish(fig, ax, path, xlabel="loop count R (iterations of the core)", ylabel=ylabel,
                   title=title, legend_size=8)


def plot_bands(series: dict[str, dict[int, list[float]]], path: Path, *, xlabel: str,
               ylabel: str, title: str = "", log2_x: bool = False,
               zero_line: bool = False) -> Path:
    """One line per series: the mean over its values at each x, with a min–max band."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 4))
    if zero_line:
        ax.axhline(0.0, color="black", linewidth=0.8)
    for label, points in series.items():
        xs = sorted(points)
        mean = [sum(points[x]) / len(points[x]) for x in xs]
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=label)
        if any(len(points[x]) > 1 for x in xs):
            ax.fill_between(xs, [min(points[x]) for x in xs], [max(points[x]) for x in xs],
                            color=line.get_color(), alpha=0.2, linewidth=0)
    if log2_x:
        _log2_loop_axis(ax, {x for p in series.values() for x in p})
    return _finish(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title, title_size=9,
                   legend_size=7)


def _log2_loop_axis(ax, xs) -> None:
    """A log2 x axis with a plain-number tick at each loop count drawn."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs))
    from matplotlib import ticker

    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def _finish(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend_size: int,
            title_size=None) -> Path:
    """Labels, grid and legend, then write the figure and free it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_heatmap(grid: dict[int, dict[int, float]], path: Path, *, row_label: str,
                 title: str = "", value_label: str = "held-out accuracy") -> Path:
    """grid[row][R] as a heatmap: rows (difficulty levels) up, loop counts R across, each cell
    printed with its value."""
    rows = sorted(grid)
    cols = sorted({r for row in grid.values() for r in row})
    values = [[grid[row].get(c, float("nan")) for c in cols] for row in rows]
    fig, ax = _pyplot().subplots(figsize=(max(4.0, 0.6 * len(cols) + 2), max(3.0, 0.5 * len(rows) + 1.5)))
    image = ax.imshow(values, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label=value_label)
    ax.set_xlabel("loop count R (iterations of the core)")
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return Path(path)


def plot_panels(panels: dict[str, dict[str, dict[float, float]]], path: Path, *, xlabel: str,
                ylabel: str) -> Path:
    """One panel per key of `panels`, each a set of labelled lines {label: {x: y}}; a label's
    text before ', ' picks its colour and the text after it its line style."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), sharey=True,
                             squeeze=False)
    colours, styles = {}, {}
    palette, dashes = plt.rcParams["axes.prop_cycle"].by_key()["color"], ("-", "--", ":", "-.")
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, curve in lines.items():
            hue, _, style = label.partition(", ")
            colour = colours.setdefault(hue, palette[len(colours) % len(palette)])
            dash = styles.setdefault(style, dashes[len(styles) % len(dashes)])
            xs = sorted(curve)
            ax.plot(xs, [curve[x] for x in xs], dash, color=colour, label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
