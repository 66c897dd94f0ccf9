"""What the spatial transformers of a sweep learned, from its run folders (stnbench-analyse).

- ``pose``: on an affine distortion without clutter (R, RTS), a PNG of the last
  ``transform/inputs_top_outputs_bottom`` image each spatial-transformer row logged (read back
  with TensorBoard's EventAccumulator), and, over the whole test set, the pose of the digit in
  the transformer's output for every run that ended ok (stnbench.pose): the spread of its
  rotation, zoom and centre against the input's own. A transformer that centres, scales and
  uprights the digits shrinks all three.
- ``attention``: on MNIST addition, each transformer's share of its output's ink that comes from
  channel 0 (the first digit; stnbench.transformer.ink_share): near 1 for a transformer that
  attends to that digit, near the input's 0.5 for one that sees both; and a PNG of 8 test
  images, the input then each transformer's output.
- ``boxes``: on co-localisation, where each run's crops sit against the digits, per split
  (iou50, the mean offset and spread in pixels, the iou50 with the offset removed), and a PNG of
  test images with the digit's box and the crop.

Each returns the table it wrote; the CSV and PNG go where it is told.
"""

import io
from functools import lru_cache
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from stnbench import data, pose, report, tblog
from stnbench.config import recipe_of
from stnbench.errors import StnbenchError
from stnbench.rundir import trained_model
from stnbench.tasks import coloc
from stnbench.transformer import ink_share

TAGS = [f"transform/{panel}" for panel in tblog.PANELS]  # the image's tag, newest first


def finished_st_runs(dirs: list[str], name: str) -> pd.DataFrame:
    """The spatial-transformer runs on data ``name`` below ``dirs`` that ended ok."""
    runs = report.collect(dirs)
    runs = runs[(runs["data"] == name) & (runs.status == "ok") & runs["transform"].notna()]
    if runs.empty:
        raise StnbenchError(
            f"no spatial-transformer runs on {name} that ended ok below {', '.join(dirs)}"
        )
    return runs


def last_image(folder: str):
    """The step and the image (PIL) of the last transformer panel a run logged."""
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"images": 0})
    events.Reload()
    tag = next((t for t in TAGS if t in events.Tags()["images"]), None)
    if tag is None:
        raise StnbenchError(f"{folder}: no {TAGS[0]} images in its TensorBoard events")
    last = events.Images(tag)[-1]
    return last.step, Image.open(io.BytesIO(last.encoded_image_string))


@lru_cache
def test_set(name: str, root: str | None, seed: int, rec) -> tuple[Tensor, Tensor]:
    """A fixed test split and the warps that made it, read and drawn once for all its runs."""
    x, _ = data.load(name, "test", root, seed, recipe=rec)
    return x, pose.known_warps(rec, "test", seed, len(x))


def pose_table(dirs: list[str], name: str, seed: int, png: Path, csv: Path) -> pd.DataFrame:
    """``pose``: the PNG of seed ``seed``'s runs and the pose CSV of every run (module doc)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    runs = finished_st_runs(dirs, name)
    order = sorted(runs.row.unique(), key=lambda r: (not r.startswith("ST-CNN"), r))
    shown = []
    for row in order:
        pick = runs[(runs.row == row) & (runs.seed == seed)]
        if len(pick):
            step, image = last_image(pick.path.iloc[0])
            shown.append((f"{row}, seed {seed}, step {step}", pick.test_error.iloc[0], image))
    if not shown:
        raise StnbenchError(f"no run of seed {seed} among them (--seed)")
    records, inputs = [], None
    for r in runs.itertuples():
        cfg, model, _ = trained_model(Path(r.path))
        rec = recipe_of(cfg)
        if rec is None:
            raise StnbenchError(f"{r.path}: plain MNIST has no distortion to measure the pose of")
        x, warp = test_set(cfg.data.name, cfg.data.root, cfg.data.seed, rec)
        if inputs is None:
            inputs = {"row": "input (no transformer)", "seed": None, "test_error": None}
            inputs.update(pose.summary(pose.measure(None, x, warp)))
        summary = pose.summary(pose.measure(model.transformer, x, warp))
        records.append({"row": r.row, "seed": r.seed, "test_error": r.test_error, **summary})
    fig = Figure(figsize=(8, 2.35 * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False)
    for ax, (title, err, image) in zip(axes[:, 0], shown, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{title}: test error {err:.2f}%", fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{name.upper()} validation digits: inputs (red: the region sampled) and the "
                 "transformer's outputs", fontsize=11)  # fmt: skip
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)

    table = pd.DataFrame([inputs, *records])
    Path(csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False, float_format="%.4g")
    return table


@torch.no_grad()
def outputs(model, x: Tensor, batch: int = 1000) -> list[Tensor]:
    """Each transformer's outputs for x, a list of (N, 2, out, out)."""
    parts = [[t(x[i : i + batch])[0] for t in model.transformers] for i in range(0, len(x), batch)]
    return [torch.cat(column) for column in zip(*parts, strict=True)]


def attention_table(dirs: list[str], seed: int, png: Path, csv: Path) -> pd.DataFrame:
    """``attention``: the CSV of every addition run's transformers and the PNG of seed
    ``seed``'s (module doc). Per run and transformer: the mean share of channel 0 over the test
    set, the fraction of images where channel 0 gives most of the ink, and the ink kept (the
    output's mean intensity over the input's; near 0 the share means nothing)."""
    from matplotlib.figure import Figure

    runs = finished_st_runs(dirs, "addition")
    records, shown, x = [], [], None
    for r in runs.itertuples():
        cfg, model, step = trained_model(Path(r.path))
        if x is None:
            x, _ = data.load("addition", "test", cfg.data.root, cfg.data.seed)
            share = ink_share(x)
            records.append({"row": "input", "share_channel0": share.mean().item(),
                            "mostly_channel0": (share > 0.5).float().mean().item()})  # fmt: skip
        outs = outputs(model, x)
        for i, out in enumerate(outs, 1):
            share = ink_share(out)
            records.append({"row": r.row, "seed": r.seed, "test_error": r.test_error,
                            "transformer": i, "share_channel0": share.mean().item(),
                            "mostly_channel0": (share > 0.5).float().mean().item(),
                            "ink_kept": (out.mean() / x.mean()).item()})  # fmt: skip
        if r.seed == seed:
            shown.append((f"{r.row}, seed {r.seed}, step {step}", [x[:8], *(o[:8] for o in outs)]))
    table = pd.DataFrame(records)
    Path(csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False, float_format="%.4g")
    if not shown:
        raise StnbenchError(f"no run of seed {seed} among them (--seed); wrote {csv} only")
    most = max(len(rows) for _, rows in shown)
    fig = Figure(figsize=(8, 1.3 * most * len(shown)), layout="constrained")
    axes = fig.subplots(len(shown), 1, squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], shown, strict=True):
        size = x.shape[-1]
        rows = [torch.nn.functional.interpolate(r, size=(size, size)) for r in rows]
        grid = torch.cat([torch.cat(list(tblog.rgb(r)), dim=2) for r in rows], dim=1)  # (3, H, W)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(f"{title}: input, then transformer 1, 2, ...", fontsize=9)
        ax.axis("off")
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return table


BOXED = ("ok", "collapsed")  # the co-localisation runs whose last model ``boxes`` reads


def boxes(dirs: list[str], seed: int, png: Path, csv: Path, shown: int = 4) -> pd.DataFrame:
    """``boxes``: on co-localisation, for every run that ended ok or collapsed, where its crops
    sit against the digits, per split (``offsets``: the CSV); and a PNG of ``shown`` test images
    of seed ``seed``'s runs, the digit's box in green and the crop in red, each beside its crop.
    Returns the CSV's table."""
    from matplotlib.figure import Figure

    runs = report.collect(dirs)
    runs = runs[(runs.get("task") == "coloc") & runs.status.isin(BOXED)]
    if runs.empty:
        raise StnbenchError(f"no co-localisation runs that ended {' or '.join(BOXED)} below "
                            f"{', '.join(dirs)}")  # fmt: skip
    runs = runs.assign(digit=runs.digit.astype(int), centring=coloc.centring_of(runs))
    runs = runs.sort_values(["data", "centring", "digit", "seed"])  # centring: coloc.table's
    drawn = runs[runs.seed == seed]
    if drawn.empty:
        raise StnbenchError(f"no co-localisation run of seed {seed} among them (--seed)")
    fig = Figure(figsize=(2 * shown, 1.1 * len(drawn)), layout="constrained")
    axes = iter(fig.subplots(len(drawn), 1, squeeze=False)[:, 0])
    records = []
    for r in runs.itertuples():
        cfg, model, _ = trained_model(Path(r.path))
        splits = coloc.splits(cfg, torch.device("cpu"))
        for split, (x, box) in splits.items():
            records.append({"data": r.data, "centring": r.centring, "digit": r.digit,
                            "seed": r.seed, "status": r.status, "split": split,
                            **offsets(model, x, box)})  # fmt: skip
        if r.seed == seed:
            ax = next(axes)
            ax.imshow(
                boxes_row(model, *(t[:shown] for t in splits["test"])), interpolation="nearest"
            )
            status = "" if r.status == "ok" else f" ({r.status})"
            loss = f", centring {r.centring:g}" if r.centring else ""
            ax.set_title(f"{r.data}{loss}, digit {r.digit}: test iou50 {r.test_iou50:.0f}%"
                         f"{status}", fontsize=8)  # fmt: skip
            ax.axis("off")
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    table = pd.DataFrame(records)
    Path(csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(csv, index=False, float_format="%.4g")
    return table


@torch.no_grad()
def offsets(model, x: Tensor, box: Tensor) -> dict:
    """Where a co-localiser's crops of images x sit against their digits' boxes: iou50 (%), the
    crops' mean offset from the digits' centres and its spread, in pixels of the canvas
    (dx, dy, sd_dx, sd_dy), the iou50 with that mean offset removed, and the mean scale. A
    biased objective gives offset crops; crops split between two places spread wide
    (docs/coloc.md)."""
    p, px = model.transformer.params(x), x.shape[-1] / 2  # pixels per normalised unit
    off = (p[:, 1:] - coloc.frame(box)[:, 1:]) * px  # (N, 2)
    moved = torch.cat([p[:, :1], p[:, 1:] - off.mean(0) / px], dim=1)
    (dx, dy), (sx, sy) = off.mean(0).tolist(), off.std(0).tolist()
    hit, unbiased = (100 * coloc.found(q, box).float().mean().item() for q in (p, moved))
    return {"iou50": hit, "dx": dx, "dy": dy, "sd_dx": sx, "sd_dy": sy,
            "iou50_offset_removed": unbiased, "scale": p[:, 0].mean().item()}  # fmt: skip


@torch.no_grad()
def boxes_row(model, x: Tensor, box: Tensor):
    """Images x with the digit's box (green) and the crop (red), each beside its crop: (H, W, 3)."""
    crops, params = model(x)
    drawn = tblog.outline(x, "attention", coloc.frame(box), coloc.CROP, color=(0.0, 1.0, 0.0))
    drawn = tblog.outline(drawn, "attention", params, coloc.CROP)
    side = x.shape[-1]
    big = tblog.rgb(torch.nn.functional.interpolate(crops, size=(side, side)))
    row = torch.cat([torch.cat(pair, dim=2) for pair in zip(drawn, big, strict=True)], dim=2)
    return row.permute(1, 2, 0).clamp(0, 1).numpy()
