"""The learning-rate range test (Smith 2017; fastai's lr_find, Lightning's Tuner.lr_find): a short
run of the configured training, the lr rising exponentially from ``lr_find.start`` to
``lr_find.end``, one step each, stopped once the smoothed loss passes ``lr_find.diverge`` times
its lowest. For ST models it also follows how far the localisation nets' sampling grids lie from
the identity, and suggests an lr only below where that distance passes ``lr_find.collapse``.
docs/sweeps.md ("The range test") says how the suggestion is chosen and how to read the figure.

Writes ``lr_find.csv`` and ``lr_find.png`` into the run's folder; returns the summary.
"""

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from stnbench import device, diagnostics, geometry, tasks
from stnbench.optim import make_optimizer, set_lr
from stnbench.train import train_step

log = logging.getLogger(__name__)
GRID = (8, 8)  # where the grid's distance from the identity is measured (enough for any kind)


def range_test(cfg: DictConfig, out: Path) -> dict:
    """Run the test; write lr_find.csv and lr_find.png under ``out``; return the summary."""
    f, out = cfg.lr_find, Path(out)
    dev = device.resolve(cfg.device)
    task = tasks.get(cfg.task.name)
    d = task.splits(cfg, dev)
    model = task.build_model(cfg, dev)
    opt = make_optimizer(model, cfg.optim)
    st = hasattr(model, "transformers")
    stream = task.batches(cfg, d, 0)
    rows, ema, lowest = [], 0.0, math.inf
    model.train()
    for step in range(f.steps):
        lr = f.start * (f.end / f.start) ** (step / max(1, f.steps - 1))
        set_lr(opt, lr / cfg.optim.lr)  # localisation nets keep their share (loc_lr_mult)
        x, y = next(stream)
        loss = train_step(model, opt, x, y, task, cfg)[0].item()
        ema = f.smoothing * ema + (1 - f.smoothing) * loss
        smoothed = ema / (1 - f.smoothing ** (step + 1))
        row = {"step": step, "lr": lr, "loss": loss, "smoothed_loss": smoothed}
        if st:
            row["grid_distance"] = farthest(model, x)
        rows.append(row)
        if not math.isfinite(smoothed) or smoothed > f.diverge * lowest:
            log.info("stopped at lr %.3g (step %d): the smoothed loss diverged", lr, step)
            break
        lowest = min(lowest, smoothed)
    frame = pd.DataFrame(rows)
    summary = suggest(frame, f)
    frame.to_csv(out / "lr_find.csv", index=False)
    plot(frame, summary, out / "lr_find.png")
    return summary


def farthest(model, x: torch.Tensor) -> float:
    """The largest grid_distance of the model's transformers on a batch x, those on the
    feature maps (model.multi) measured on the feature maps that reach them."""
    pairs = [(t, x) for t in model.transformers] + diagnostics.feature_inputs(model, x)
    return max(grid_distance(t, inputs) for t, inputs in pairs)


@torch.no_grad()
def grid_distance(transformer, x: torch.Tensor) -> float:
    """RMS distance of the batch's sampling grids from the identity grid, in half-widths."""
    p = transformer.params(x)
    moved = geometry.grid(transformer.kind, p, GRID)
    still = geometry.grid(transformer.kind, transformer.identity.expand_as(p), GRID)
    return (moved - still).pow(2).sum(-1).mean().sqrt().item()


def suggest(frame: pd.DataFrame, f) -> dict:
    """The suggested lr: the steepest fall of the smoothed loss against log lr, the first tenth
    skipped, among the lrs where it lies below the untrained model's loss and, for ST models,
    below the collapse lr (None if the loss never fell); the collapse lr (None if never
    reached) and where the test stopped."""
    collapse_lr = None
    if "grid_distance" in frame:
        over = frame[frame.grid_distance.rolling(5, min_periods=1).mean() > f.collapse]
        collapse_lr = None if over.empty else float(over.lr.iloc[0])
    usable = frame.iloc[len(frame) // 10 :]  # where the loss has fallen below its start
    usable = usable[usable.smoothed_loss < frame.loss.iloc[0]]
    if collapse_lr is not None:
        usable = usable[usable.lr < collapse_lr]
    suggested = None
    if len(usable) >= 3:
        slope = np.gradient(usable.smoothed_loss.to_numpy(), np.log(usable.lr.to_numpy()))
        if slope.min() < 0:
            suggested = float(usable.lr.iloc[int(np.argmin(slope))])
    return {"suggested_lr": suggested, "collapse_lr": collapse_lr,
            "stopped_lr": float(frame.lr.iloc[-1]), "steps": len(frame)}  # fmt: skip


def plot(frame: pd.DataFrame, summary: dict, path: Path) -> None:
    """Loss against lr (log axis), the suggestion marked; the grid's distance for ST models."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    st = "grid_distance" in frame
    fig = Figure(figsize=(6, 3.2 * (1 + st)))
    axes = fig.subplots(1 + st, 1, sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(frame.lr, frame.loss, color="0.75", lw=0.8, label="loss")
    ax.plot(frame.lr, frame.smoothed_loss, color="C0", label="smoothed")
    finite = frame.smoothed_loss[frame.smoothed_loss.apply(math.isfinite)]
    ax.set_ylim(finite.min() * 0.9, min(finite.max(), 4 * finite.min()) * 1.05)
    ax.set_ylabel("training loss")
    if st:
        axes[1, 0].plot(frame.lr, frame.grid_distance, color="C1", label="grid distance")
        axes[1, 0].set_ylabel("grid's distance from\nthe identity (half-widths)")
    for a in axes[:, 0]:
        a.set_xscale("log")
        if summary["suggested_lr"]:
            a.axvline(summary["suggested_lr"], color="C2", ls="--",
                      label=f"suggested {summary['suggested_lr']:.3g}")  # fmt: skip
        if summary["collapse_lr"]:
            a.axvline(summary["collapse_lr"], color="C3", ls=":",
                      label=f"localisation collapse {summary['collapse_lr']:.3g}")  # fmt: skip
        a.legend(fontsize=8)
    axes[-1, 0].set_xlabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
