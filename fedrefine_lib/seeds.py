"""Headline numbers over world seeds: read each seed's metrics files (``make seeds`` writes
``results/<profile>/seeds/<seed>/``), report every headline as mean, spread and per-seed
values, and plot them.

    python -m fedrefine_lib.seeds results/mini/seeds --out results/mini/seeds.json
    python -m fedrefine_lib.seeds results/mini/fuser_seeds --out results/mini/fuser_seeds.json --files c2c.json

A headline is a number at a dotted path of one notebook's metrics file (an accuracy's
``value``, a paired difference's ``diff``). A seed whose file or path is missing is an
error naming both (a silent gap would bias the mean), unless ``allow_missing``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

#: label -> (metrics file, dotted path). Accuracies are shares, differences in shares.
HEADLINES: dict[str, tuple[str, str]] = {
    "world: rephrasing fidelity": ("world.json", "acceptance.rephrase_fidelity"),
    "01 receiver alone (sender's domains)": ("c2c.json", "accuracy_sender_domains.receiver_alone.value"),
    "01 C2C (sender's domains)": ("c2c.json", "accuracy_sender_domains.c2c.value"),
    "01 T2T background (sender's domains)": ("c2c.json", "accuracy_sender_domains.t2t.value"),
    "01 T2T answer relay (sender's domains)": ("c2c.json", "accuracy_sender_domains.t2t_answer.value"),
    "01 C2C - receiver alone": ("c2c.json", "paired_sender_domains.c2c - receiver_alone.diff"),
    "01 C2C - answer relay": ("c2c.json", "paired_sender_domains.c2c - t2t_answer.diff"),
    "01 C2C - fine-tuned receiver": ("c2c.json", "paired_sender_domains.c2c - finetuned_receiver.diff"),
    "03 4 senders, equal weights": ("fedrefine.json", "policies.equal.value"),
    "03 4 senders, learned gate": ("fedrefine.json", "policies.learned_gate.value"),
    "03 learned gate - equal": ("fedrefine.json", "paired.learned_gate - equal.diff"),
    "03 two-fact: best two - route to one": (
        "fedrefine.json",
        "two_device.paired.best two (validation) - route to one (validation).diff",
    ),
    "04 KV, 4 senders": ("case_study.json", "four_senders.KV-Original.value"),
    "04 KV - Token, 4 senders": ("case_study.json", "four_senders_paired.KV-Original - Token-Original.diff"),
    "04 KV - answer relay, 4 senders": ("case_study.json", "four_senders_paired.KV-Original - Answer-Original.diff"),
    "04 rephrasing cost, KV": ("case_study.json", "four_senders_paired.KV-Rephrased - KV-Original.diff"),
    "04 KV - answer relay, routed": ("case_study.json", "routed.paired.KV, routed - Answer, routed.diff"),
    "04 private names leaked, rephrased": ("case_study.json", "rephrase.leakage.rephrased.private_survival"),
}


def lookup(metrics: Mapping, path: str):
    """The value at a dotted ``path`` (keys may hold spaces and dashes, not dots)."""
    node = metrics
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(part)
        node = node[part]
    return node


def seed_dirs(root: str | Path) -> dict[int, Path]:
    """``{seed: directory}`` for every integer-named folder under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist: run `make seeds` first (it writes one folder per seed).")
    return {int(p.name): p for p in sorted(root.iterdir()) if p.is_dir() and p.name.isdigit()}


def summarize_seeds(
    root: str | Path, headlines: Mapping[str, tuple[str, str]] = HEADLINES, allow_missing: bool = False
) -> dict:
    """Per headline: ``mean``, ``sd`` (sample), ``min``, ``max``, ``n`` and ``per_seed``.

    Raises:
        FileNotFoundError / KeyError: a seed lacks a metrics file or a headline's path (the
            message names the seed, file and path), unless ``allow_missing`` (then the seed is
            left out of that headline and listed under ``missing``).
    """
    dirs = seed_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"No seed folders (named 0, 1, ...) under {root}; run `make seeds`.")
    cache: dict[tuple[int, str], dict] = {}
    out: dict = {"seeds": sorted(dirs), "headlines": {}}
    for label, (name, path) in headlines.items():
        values, missing = {}, []
        for seed, folder in dirs.items():
            try:
                if (seed, name) not in cache:
                    cache[seed, name] = json.loads((folder / name).read_text())
                value = lookup(cache[seed, name], path)
            except (FileNotFoundError, KeyError) as err:
                if not allow_missing:
                    raise type(err)(f"seed {seed}: {folder / name} has no {path!r} ({err}); rerun that seed.") from err
                missing.append(seed)
                continue
            values[seed] = float("nan") if value is None else float(value)
        finite = [v for v in values.values() if not math.isnan(v)]
        out["headlines"][label] = {
            "file": name,
            "path": path,
            "n": len(finite),
            "mean": statistics.fmean(finite) if finite else None,
            "sd": statistics.stdev(finite) if len(finite) > 1 else None,
            "min": min(finite, default=None),
            "max": max(finite, default=None),
            "per_seed": {str(s): v for s, v in values.items()},
            "missing": missing,
        }
    return out


def table(summary: Mapping) -> list[dict]:
    """One row per headline: mean ± sd [min, max] over n seeds, as text for a README table."""
    rows = []
    for label, h in summary["headlines"].items():
        if h["mean"] is None:
            rows.append({"headline": label, "over seeds": "no finite value", "per seed": ""})
            continue
        sd = "" if h["sd"] is None else f" ± {h['sd']:.3f}"
        rows.append(
            {
                "headline": label,
                "over seeds": f"{h['mean']:.3f}{sd} [{h['min']:.3f}, {h['max']:.3f}] (n={h['n']})",
                "per seed": ", ".join(f"{s}: {v:.3f}" for s, v in h["per_seed"].items()),
            }
        )
    return rows


def plot(summary: Mapping, path: str | Path | None = None, labels: Sequence[str] | None = None):
    """Per headline the per-seed values (dots) and their mean (a bar)."""
    import matplotlib.pyplot as plt

    labels = list(labels or summary["headlines"])
    fig, ax = plt.subplots(figsize=(7.5, 0.38 * len(labels) + 1.2))
    for i, label in enumerate(labels):
        h = summary["headlines"][label]
        vals = [v for v in h["per_seed"].values() if not math.isnan(v)]
        ax.scatter(vals, [i] * len(vals), color="tab:blue", s=18, zorder=3)
        if h["mean"] is not None:
            ax.plot([h["mean"]] * 2, [i - 0.3, i + 0.3], color="black", lw=2)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"share (accuracy or difference); dots: seeds {summary['seeds']}, bar: mean")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130)
    plt.close(fig)
    return fig


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder with one subfolder of metrics files per seed")
    parser.add_argument("--out", required=True, help="summary JSON to write (a figure beside it)")
    parser.add_argument("--allow-missing", action="store_true", help="leave out seeds lacking a headline")
    parser.add_argument("--files", nargs="*", default=None, help="only the headlines of these metrics files")
    args = parser.parse_args(argv)
    headlines = {k: v for k, v in HEADLINES.items() if args.files is None or v[0] in args.files}
    if not headlines:
        known = sorted({v[0] for v in HEADLINES.values()})
        parser.error(f"--files {args.files}: no headline reads them; the headlines read {known}.")
    summary = summarize_seeds(args.root, headlines, allow_missing=args.allow_missing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    plot(summary, out.with_suffix(".png"))
    for row in table(summary):
        print(f"{row['headline']:<45} {row['over seeds']}")
    return summary


if __name__ == "__main__":
    main()
