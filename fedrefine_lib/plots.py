"""Seaborn figures for every result. Each function draws one figure, saves it as PNG when
given a path, and returns the matplotlib ``Figure``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def _finish(fig, path: str | Path | None):
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def _record(acc) -> tuple[float, float, float]:
    """(value, ci_low, ci_high) from an accuracy record (dict from a metrics file or object)."""
    if isinstance(acc, Mapping):
        lo, hi = acc["ci95"]
        return acc["value"], lo, hi
    return acc.value, acc.ci_low, acc.ci_high


def accuracy_bars(
    accuracies: Mapping[str, object],
    title: str = "",
    path: str | Path | None = None,
    chance: float | None = 0.25,
    hue: Mapping[str, str] | None = None,
):
    """Bar per named accuracy with its 95 % CI as an error bar."""
    names = list(accuracies)
    vals = [_record(accuracies[n]) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1), 3.6))
    colors = sns.color_palette("deep", len(set(hue.values())) if hue else len(names))
    palette = {g: colors[i] for i, g in enumerate(dict.fromkeys(hue.values()))} if hue else None
    for i, (name, (v, lo, hi)) in enumerate(zip(names, vals)):
        color = palette[hue[name]] if palette else colors[i]
        ax.bar(i, v, color=color, yerr=[[v - lo], [hi - v]], capsize=4)
        ax.text(i, min(hi + 0.02, 1.02), f"{v:.0%}", ha="center", va="bottom", fontsize=9)
    if chance is not None:
        ax.axhline(chance, ls="--", color="grey", lw=1, label="chance")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_title(title)
    return _finish(fig, path)


def heatmap(
    table: pd.DataFrame,
    title: str = "",
    path: str | Path | None = None,
    fmt: str = ".0%",
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
):
    """An annotated heatmap of a 2-D table (rows x columns)."""
    fig, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 3, 0.55 * table.shape[0] + 1.6))
    sns.heatmap(table.astype(float), annot=True, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax, ax=ax, cbar=False)
    ax.set_title(title)
    return _finish(fig, path)


def curves(
    series: Mapping[str, Sequence[float]],
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "loss",
    path: str | Path | None = None,
    smooth: int = 1,
):
    """Training curves, one line per named series (running mean over ``smooth`` points)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, values in series.items():
        s = pd.Series(values, dtype=float)
        ax.plot(s.index, s.rolling(max(1, smooth), min_periods=1).mean(), label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel + (f" (running mean of {smooth})" if smooth > 1 else ""), title=title)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def per_layer(
    values: Mapping[str, Sequence[float]],
    title: str = "",
    ylabel: str = "gate",
    path: str | Path | None = None,
    xlabel: str = "receiver layer",
):
    """One line per series over layers (e.g. K and V gates per receiver layer)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, ys in values.items():
        ax.plot(range(len(ys)), ys, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def grouped_bars(
    frame: pd.DataFrame,
    x: str,
    y: str,
    hue: str,
    title: str = "",
    path: str | Path | None = None,
    ylabel: str | None = None,
    log: bool = False,
):
    """Grouped bars from a long-form table."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * frame[x].nunique() * frame[hue].nunique() + 2), 3.6))
    sns.barplot(frame, x=x, y=y, hue=hue, ax=ax)
    if log:
        ax.set_yscale("log")
    ax.set(title=title, ylabel=ylabel or y)
    ax.tick_params(axis="x", rotation=15)
    return _finish(fig, path)


def accuracy_vs_senders(
    frames: Mapping[str, pd.DataFrame],
    title: str = "",
    path: str | Path | None = None,
    points: Mapping[str, tuple[int, float]] | None = None,
    baseline: float | None = None,
):
    """Accuracy against the number of senders k: per series the mean over subsets with a
    min-max band (``frames``: label -> ``sweep.by_size`` table); ``points`` adds single
    markers (e.g. a gated policy at k = 4); ``baseline`` a dashed line (e.g. the oracle)."""
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, f in frames.items():
        (line,) = ax.plot(f["k"], f["mean"], marker="o", label=label)
        ax.fill_between(f["k"], f["min"], f["max"], color=line.get_color(), alpha=0.15)
    for label, (k, acc) in (points or {}).items():
        ax.scatter([k], [acc], marker="*", s=140, zorder=5, label=label)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="grey", lw=1, label="oracle")
    ax.set(xlabel="number of senders", ylabel="accuracy", title=title, ylim=(0, 1.05))
    ax.set_xticks(sorted({int(k) for f in frames.values() for k in f["k"]}))
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig, path)


def stacked_bars(frame: pd.DataFrame, title: str = "", ylabel: str = "", path: str | Path | None = None):
    """Stacked bars: rows are bars, columns are the stacked parts (e.g. latency stages)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(frame) + 2), 3.8))
    frame.plot(kind="bar", stacked=True, ax=ax, colormap="tab20")
    ax.set(title=title, ylabel=ylabel, xlabel="")
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _finish(fig, path)


def scatter(
    frame: pd.DataFrame,
    x: str,
    y: str,
    label: str,
    title: str = "",
    path: str | Path | None = None,
    diagonal: bool = True,
):
    """Labelled scatter (e.g. accuracy with one sender vs that sender's own accuracy)."""
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    sns.scatterplot(frame, x=x, y=y, ax=ax, s=70)
    for _, row in frame.iterrows():
        ax.annotate(str(row[label]), (row[x], row[y]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if diagonal:
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set(title=title, xlim=(0, 1.05), ylim=(0, 1.05))
    return _finish(fig, path)


def accuracy_vs_bytes(table: pd.DataFrame, group: str, title: str = "", path: str | Path | None = None):
    """Accuracy (with its interval) against bytes per query on a log axis, one colour per
    ``group`` (e.g. fuser or protocol); options sending nothing are drawn at the left edge."""
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    floor = max(1.0, 0.5 * table.loc[table["bytes_per_query"] > 0, "bytes_per_query"].min())
    t = table.assign(x=table["bytes_per_query"].clip(lower=floor))
    for name, part in t.groupby(group, sort=False, dropna=False):
        err = [part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]]
        ax.errorbar(part["x"], part["accuracy"], yerr=err, fmt="o", ms=5, capsize=2, label=str(name), alpha=0.85)
    ax.set_xscale("log")
    ax.set(title=title, xlabel="bytes per query (payload; log)", ylabel="accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=7, loc="lower right")
    return _finish(fig, path)


def policy_sweep(frame: pd.DataFrame, title: str = "", path: str | Path | None = None):
    """Share of requests answered right within the budget against link bandwidth (log), one
    line per policy (``qos.sweep``)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, part in frame.groupby("policy", sort=False):
        ax.plot(part["bandwidth_mbps"], part["served"], marker="o", ms=3, label=str(name))
    ax.set_xscale("log")
    ax.set(title=title, xlabel="bandwidth (Mbit/s, log)", ylabel="right within the budget", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return _finish(fig, path)


def privacy_vs_accuracy(
    table: pd.DataFrame, x: str = "private_recovery", title: str = "", path: str | Path | None = None
):
    """Each defence's accuracy (with its interval) against what its strongest attack recovers
    (``x``), one colour per ``arm``; the defence's name beside its point."""
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    for name, part in table.groupby("arm", sort=False):
        err = [part["accuracy"] - part["ci_low"], part["ci_high"] - part["accuracy"]]
        ax.errorbar(part[x], part["accuracy"], yerr=err, fmt="o", ms=5, capsize=2, label=str(name), alpha=0.85)
        for _, row in part.iterrows():
            ax.annotate(str(row["defence"]), (row[x], row["accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set(title=title, xlabel=f"{x.replace('_', ' ')} (strongest attack)", ylabel="accuracy",
           xlim=(-0.05, 1.05), ylim=(0, 1.05))  # fmt: skip
    ax.legend(fontsize=7, loc="lower left")
    return _finish(fig, path)
