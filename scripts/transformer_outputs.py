"""What the spatial transformers of a sweep learned to do on an affine distortion (default RTS).

1. A PNG: for each spatial-transformer row, the last ``transform/inputs_top_outputs_bottom``
   image that its run of seed --seed logged to TensorBoard, read back with TensorBoard's own
   EventAccumulator: 8 fixed validation digits, each input with the outline of the region the
   transformer samples, above the transformer's output (side by side in runs written before
   2026-12-07).
2. The pose of the digit in the transformer's output over the whole test set, for every run that
   ended ok (stnbench.pose): the spread of its rotation, zoom and centre, against the same
   figures for the input itself. A transformer that centres, scales and uprights the digits
   shrinks all three.

    python scripts/transformer_outputs.py outputs/paper_table1_cpu [--data rts] [--seed 0]
        [--png docs/figures/rts_transformer_outputs.png] [--csv docs/rts_pose.csv]
"""

import argparse
import io
import sys
from functools import lru_cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from stnbench import data, pose, report, tblog  # noqa: E402
from stnbench.config import recipe_of  # noqa: E402
from stnbench.train import trained_model  # noqa: E402

TAGS = [f"transform/{panel}" for panel in tblog.PANELS]


def last_image(folder: str) -> tuple[int, Image.Image]:
    events = EventAccumulator(folder, size_guidance={"images": 0})
    events.Reload()
    tag = next((t for t in TAGS if t in events.Tags()["images"]), None)
    if tag is None:
        sys.exit(f"{folder}: no {TAGS[0]} images in its TensorBoard events")
    last = events.Images(tag)[-1]
    return last.step, Image.open(io.BytesIO(last.encoded_image_string))


def load_transformer(folder: Path):
    cfg, model, step = trained_model(folder)
    rec = recipe_of(cfg)
    if rec is None:
        sys.exit(f"{folder}: plain MNIST has no distortion to measure the pose against")
    return cfg, rec, model.transformer, step


@lru_cache
def test_set(name: str, root: str | None, seed: int, rec) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed test split and the warps that made it, read and drawn once for all its runs."""
    x, _ = data.load(name, "test", root, seed, recipe=rec)
    return x, pose.known_warps(rec, "test", seed, len(x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep folders (what stnbench-report reads)")
    ap.add_argument("--data", default="rts", help="the distortion (affine, no clutter)")
    ap.add_argument("--seed", type=int, default=0, help="the run whose images the PNG shows")
    ap.add_argument("--png", help="default: docs/figures/<data>_transformer_outputs.png")
    ap.add_argument("--csv", help="default: docs/<data>_pose.csv")
    args = ap.parse_args()
    args.png = args.png or f"docs/figures/{args.data}_transformer_outputs.png"
    args.csv = args.csv or f"docs/{args.data}_pose.csv"

    runs = report.collect(args.dirs)
    runs = runs[(runs.data == args.data) & runs["transform"].notna()]
    runs = runs[runs.status == "ok"]
    if runs.empty:
        sys.exit(f"no spatial-transformer runs on {args.data} that ended ok below {args.dirs}")
    order = sorted(runs.row.unique(), key=lambda r: (not r.startswith("ST-CNN"), r))

    shown = []
    for row in order:
        pick = runs[(runs.row == row) & (runs.seed == args.seed)]
        if len(pick):
            step, image = last_image(pick.path.iloc[0])
            shown.append((f"{row}, seed {args.seed}, step {step}", pick.test_error.iloc[0], image))
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.35 * len(shown)), squeeze=False)
    for ax, (title, err, image) in zip(axes[:, 0], shown, strict=True):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"{title}: test error {err:.2f}%", fontsize=10)
        ax.axis("off")
    fig.suptitle(
        f"{args.data.upper()} validation digits: input (red: the region sampled) | output",
        fontsize=11,
    )
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")

    records, inputs = [], None
    for r in runs.itertuples():
        cfg, rec, transformer, step = load_transformer(Path(r.path))
        x, warp = test_set(cfg.data.name, cfg.data.root, cfg.data.seed, rec)
        if inputs is None:
            inputs = {"row": "input (no transformer)", "seed": None, "test_error": None}
            inputs.update(pose.summary(pose.measure(None, x, warp)))
        summary = pose.summary(pose.measure(transformer, x, warp))
        records.append({"row": r.row, "seed": r.seed, "test_error": r.test_error, **summary})
        print(f"{r.row} seed {r.seed} (step {step}): {summary}")
    table = pd.DataFrame([inputs, *records])
    table.to_csv(args.csv, index=False, float_format="%.4g")
    print(f"wrote {args.csv}")
    means = table.groupby("row", sort=False).mean(numeric_only=True).drop(columns="seed")
    print(means.round(3).to_string())


if __name__ == "__main__":
    main()
