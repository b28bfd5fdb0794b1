"""Loss curves from metrics.jsonl to a PNG (needs matplotlib: pip install 'neolm[plot]')."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def plot_metrics(metrics: Path, png: Path) -> str | None:
    """Draw training loss (raw and smoothed) and validation loss against step; the PNG's path, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed, so no loss plot: pip install 'neolm[plot]'")
        return None
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    smooth, value = [], loss[0] if loss else 0.0
    for x in loss:
        value = 0.95 * value + 0.05 * x
        smooth.append(value)
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.5, label="train loss (EMA 0.95)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", markersize=3, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return str(png)
