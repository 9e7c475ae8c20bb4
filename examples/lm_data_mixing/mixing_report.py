"""Summaries, the results table and the plot of the weights over training."""

from __future__ import annotations

import statistics
from pathlib import Path

LABELS = {"domain": "betty: domain weights", "mwn": "betty: per-example weights (MWN)"}


def label(name: str) -> str:
    if ":" not in name:
        return name
    variant, method = name.split(":")
    return f"{LABELS[variant]}, {method}"


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def summarize(result: dict) -> dict:
    """Per run name: test bits per byte, final weights of the harmful and target domains
    (MWN: their share of the total weight on the last recorded batches), seconds."""
    domains = result["domains"]
    harmful = domains.index(result["harmful"][0])
    target = domains.index(result["target"])
    summary: dict = {}
    for r in result["runs"]:
        row = summary.setdefault(r["name"], {"test_bpb": [], "harmful_weight": [],
                                             "target_weight": [], "seconds": []})
        row["test_bpb"].append(r["test_bpb"])
        row["harmful_weight"].append(r["final_weights"][harmful])
        row["target_weight"].append(r["final_weights"][target])
        row["seconds"].append(r["seconds"])
    return summary


def format_table(result: dict) -> str:
    harmful, target = result["harmful"][0], result["target"]
    seeds = len(result["settings"]["seeds"])
    lines = [f"| run | {target} test bits/byte (mean ± std, {seeds} seeds) | "
             f"final weight of {harmful} (harmful) | final weight of {target} (target) | "
             "seconds per run |", "|---|---|---|---|---|"]
    best = min(statistics.fmean(row["test_bpb"]) for row in result["summary"].values())
    for name, row in result["summary"].items():
        bpb = mean_std(row["test_bpb"])
        if statistics.fmean(row["test_bpb"]) == best:
            bpb = f"**{bpb}**"
        lines.append(f"| {label(name)} | {bpb} | {mean_std(row['harmful_weight'])} | "
                     f"{mean_std(row['target_weight'])} | "
                     f"{statistics.fmean(row['seconds']):.1f} |")
    return "\n".join(lines)


def _mean_curve(runs: list[dict], domain: int) -> tuple[list[int], list[float]]:
    """The weight of ``domain`` at each recorded step, averaged over the runs (seeds)."""
    steps = [s for s, _ in runs[0]["history"]]
    values = [statistics.fmean(r["history"][i][1][domain] for r in runs
                               if i < len(r["history"])) for i in range(len(steps))]
    return steps, values


def save_plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    learned = [n for n in result["summary"] if ":" in n]
    fig, axes = plt.subplots(1, max(1, len(learned)), figsize=(5.5 * max(1, len(learned)), 4),
                             squeeze=False)
    uniform = 1 / len(result["domains"])
    for ax, name in zip(axes[0], learned):
        runs = [r for r in result["runs"] if r["name"] == name]
        for i, domain in enumerate(result["domains"]):
            steps, values = _mean_curve(runs, i)
            style = "--" if domain in result["harmful"] else "-"
            width = 2.5 if domain == result["target"] else 1.5
            ax.plot(steps, values, style, linewidth=width, label=domain)
        ax.axhline(uniform, color="grey", linewidth=0.8, linestyle=":")
        what = "domain weight" if name.startswith("domain") else "share of the total weight"
        ax.set(xlabel="LM step", ylabel=what, ylim=(0, None))
        ax.set_title(f"{label(name)} (mean of {len(runs)} seeds)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
