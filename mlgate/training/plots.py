"""The images a trial run shows in the MLflow UI: gate trajectories, the gradient-gap curve against
the collapse line, per-depth lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _figure():
    # A bare Agg figure with fixed margins: no pyplot state to close, and no tight_layout, which draws
    # every text once more to measure it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.14, top=0.91)
    return fig, fig.subplots()


def gate_trajectory(out: Path, steps: Sequence[int], values: Sequence[np.ndarray]) -> None:
    """σ of every gate at every recorded step: ``trajectory.npy``, ``steps.npy``, ``trajectory.png``."""
    out.mkdir(parents=True, exist_ok=True)
    trajectory = np.stack(values)
    np.save(out / "trajectory.npy", trajectory)
    np.save(out / "steps.npy", np.asarray(steps))
    fig, ax = _figure()
    for i in range(trajectory.shape[1]):
        ax.plot(steps, trajectory[:, i], label=f"gate {i}")
    ax.set(xlabel="step", ylabel="σ(g)", title="Gate activations over training", ylim=(0, 1))
    if trajectory.shape[1] <= 16:
        ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / "trajectory.png")


def trial_plots(out: Path, series: Mapping[str, Sequence[float]], steps: Mapping[str, Sequence[int]],
                gap_threshold: float) -> None:
    """``gradient_gap.png`` (with the collapse line) and ``depth_lengths.png`` where the metrics exist."""
    out.mkdir(parents=True, exist_ok=True)
    if series.get("grad/gap_log10"):
        fig, ax = _figure()
        ax.plot(steps["grad/gap_log10"], series["grad/gap_log10"], label="log10(prompt / gate gradient)")
        ax.axhline(gap_threshold, color="red", linestyle="--", label=f"{gap_threshold:g} orders: collapse")
        ax.set(xlabel="step", ylabel="orders of magnitude", title="Gradient gap")
        ax.legend(fontsize=8)
        fig.savefig(out / "gradient_gap.png")
    for prefix, label in (("gate/effective_length/d", "effective length Σσ"), ("mask/active_tokens/d", "active tokens")):
        keys = sorted((k for k in series if k.startswith(prefix) and k[len(prefix):].isdigit()),
                      key=lambda k: int(k[len(prefix):]))
        if not keys:
            continue
        fig, ax = _figure()
        for k in keys:
            ax.plot(steps[k], series[k], label=f"depth {k[len(prefix):]}")
        ax.set(xlabel="step", ylabel=label, title="Per-depth prompt length")
        ax.legend(fontsize=7, ncol=2)
        fig.savefig(out / "depth_lengths.png")


def mask_image(text: np.ndarray, vision: np.ndarray, scale: int = 12) -> np.ndarray:
    """One RGB uint8 image of both branches' masks side by side (rows = depth, columns = slot):
    white = active, black = pruned, a grey bar between the branches."""
    gap = np.full((text.shape[0], 1), 0.5)
    grid = np.concatenate([text, gap, vision], axis=1)
    pixels = np.kron(grid, np.ones((scale, scale)))
    return (np.repeat(pixels[..., None], 3, axis=-1) * 255).astype(np.uint8)
