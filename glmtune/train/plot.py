"""The loss curve (train and eval loss against the step) as a PNG, from train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def loss_figure(entries: list[dict], title: str = "glmtune training", *, labels=("train loss", "eval loss")):
    """A matplotlib Figure of train and eval loss against the step, or None when there is nothing to plot. Built
    without pyplot's global state, so threads (the studio's page) can draw at the same time."""
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not evals:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label=labels[0], color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label=labels[1], color="tab:orange")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_loss(log_path: Path, png_path: Path, title: str = "glmtune training") -> Path | None:
    """Writes the PNG and returns its path, or None when there is nothing to plot."""
    fig = loss_figure(read_log(log_path), title)
    if fig is None:
        return None
    fig.savefig(png_path)
    return Path(png_path)
