"""The loss curve (train and eval loss against the step) as a PNG, from train_log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(log_path: Path, png_path: Path, title: str = "glmtune training") -> Path | None:
    """Writes the PNG and returns its path, or None when there is nothing to plot."""
    entries = read_log(log_path)
    train = [(e["step"], e["loss"]) for e in entries if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in entries if "eval_loss" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
