"""Plots of runs (Figure 4's curves with α) and of the toy problem (Figure 3).

matplotlib is imported here only, and only when a plot is drawn.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_run", "plot_toy", "plot_runs"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install matplotlib") from err
    return plt


def plot_run(history: list[dict], path: str | Path, title: str = "") -> Path:
    """Test accuracy of the blended model, the full-precision view and the quantized
    view per epoch, with α on a second axis (the paper's Figure 4), and the train loss."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    telemetry = [k for k in ("w_rel_dist", "codes_changed", "act_clipped")
                 if any(k in r for r in history)]
    fig, axes = plt.subplots(1, 3 if telemetry else 2, figsize=(16 if telemetry else 11, 4))
    acc_ax, loss_ax = axes[0], axes[1]
    for key, label, style in (("test_acc", "blended model", "-"),
                              ("fp_test_acc", "full-precision view (α = 0)", "--"),
                              ("q_test_acc", "quantized view (α = 1)", "-.")):
        if key in history[0]:
            acc_ax.plot(epochs, [r[key] for r in history], style, marker="o", ms=3, label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("test top-1 (%)")
    if any("q_test_acc" in r for r in history):
        alpha_ax = acc_ax.twinx()
        alpha_ax.plot(epochs, [r["alpha"] for r in history], color="gray", lw=1, label="α")
        alpha_ax.set_ylim(-0.05, 1.05)
        alpha_ax.set_ylabel("α (end of epoch)")
        alpha_ax.legend(loc="center right", fontsize=8, framealpha=0.6)
    acc_ax.legend(loc="best", fontsize=8, framealpha=0.6)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("train loss")
    if telemetry:
        labels = {"w_rel_dist": "‖w − P(w)‖ / ‖w‖", "codes_changed": "weight codes changed",
                  "act_clipped": "inputs at the grid's ends"}
        for key in telemetry:
            points = [(r["epoch"], r[key]) for r in history if key in r]
            axes[2].plot(*zip(*points, strict=True), marker="o", ms=3, label=labels[key])
        axes[2].set_xlabel("epoch")
        axes[2].set_ylabel("fraction")
        axes[2].set_yscale("log")
        axes[2].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_runs(histories: dict[str, list[dict]], path: str | Path, title: str = "",
              start: dict[str, int] | None = None) -> Path:
    """Test accuracy (quantized view where there is one) of several runs on one axis;
    ``start``: epochs a run continues after (a quantized run from the float run)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    start = start or {}
    for label, history in histories.items():
        key = "q_test_acc" if "q_test_acc" in history[0] else "test_acc"
        ax.plot([start.get(label, 0) + r["epoch"] for r in history],
                [r[key] for r in history], marker="o", ms=3, label=label)
    ax.set_xlabel("epoch (quantized runs continue the float run)" if start else "epoch")
    ax.set_ylabel("test top-1 (%), quantized model")
    ax.legend(loc="best", framealpha=0.6, fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_toy(trace, path: str | Path) -> Path:
    """The toy problem's trajectory: ``w`` and ``w_q`` against the step, α on a second axis."""
    plt = _pyplot()
    steps = [t.step for t in trace]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(steps, [t.w for t in trace], "x-", label="w (full precision)")
    ax.plot(steps, [t.wq for t in trace], "+", ms=10, label="w_q = round(w)")
    ax.axhline(5.7, color="gray", ls=":", lw=1, label="5.7 (float optimum)")
    ax.set_xlabel("SGD step")
    ax.set_ylabel("weight")
    ax2 = ax.twinx()
    ax2.plot(steps, [t.alpha for t in trace], color="tab:red", lw=1, label="α (eq. 6)")
    ax2.set_ylabel("α")
    ax.legend(loc="center right")
    ax2.legend(loc="lower right")
    last = trace[-1]
    ax.set_title(f"min (w - 5.7)², AB: w = {last.w:.4f}, α = {last.alpha:g}, w_q = {last.wq:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
