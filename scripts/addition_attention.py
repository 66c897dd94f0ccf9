"""Whether the transformers of MNIST-addition models each attend to one digit (Appendix A.1).

For every spatial-transformer run on `addition` that ended ok, each transformer's outputs over the
test set: a transformer warps both channels alike, channel 0 holding the first digit and channel 1
its partner, so the share of its output's ink that comes from channel 0 says which digit it looks
at. One that attends to the first digit zooms onto it and keeps most of its ink (share near 1);
one that sees both keeps about the input's own share (near 0.5).

Writes a CSV (per run and transformer: the mean share over the test set, the fraction of test
images where channel 0 gives most of the ink, and the ink kept: the output's mean intensity over
the input's, near 0 for a transformer that looks at empty canvas, whose share then means
nothing) and a PNG of 8 test images: the input, then
each transformer's output (channel 0 green, channel 1 blue).

    python scripts/addition_attention.py outputs/paper_addition_cpu
        [--csv outputs/results/addition_cpu/attention.csv] [--png ...attention.png]
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from stnbench import data, report, tblog  # noqa: E402
from stnbench.train import trained_model  # noqa: E402
from stnbench.transformer import ink_share  # noqa: E402


@torch.no_grad()
def outputs(model, x: torch.Tensor, batch: int = 1000) -> list[torch.Tensor]:
    """Each transformer's outputs for x, a list of (N, 2, out, out)."""
    parts = [[t(x[i : i + batch])[0] for t in model.transformers] for i in range(0, len(x), batch)]
    return [torch.cat(column) for column in zip(*parts, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="sweep folders (what stnbench-report reads)")
    ap.add_argument("--seed", type=int, default=0, help="the run of each row the PNG shows")
    ap.add_argument("--csv", default="docs/addition_attention.csv")
    ap.add_argument("--png", default="docs/figures/addition_attention.png")
    args = ap.parse_args()
    runs = report.collect([Path(d) for d in args.dirs])
    runs = runs[(runs["data"] == "addition") & (runs.status == "ok") & runs["transform"].notna()]
    if runs.empty:
        sys.exit(f"no spatial-transformer runs on addition that ended ok below {args.dirs}")

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
        if r.seed == args.seed:
            shown.append((f"{r.row}, seed {r.seed}, step {step}", [x[:8], *(o[:8] for o in outs)]))
    table = pd.DataFrame(records)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.csv, index=False, float_format="%.4g")
    print(table.round(3).to_string(index=False))
    print(f"wrote {args.csv}")

    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.3 * (1 + len(outs)) * len(shown)),
                             squeeze=False)  # fmt: skip
    for ax, (title, rows) in zip(axes[:, 0], shown, strict=True):
        size = x.shape[-1]
        rows = [torch.nn.functional.interpolate(r, size=(size, size)) for r in rows]
        grid = torch.cat([torch.cat(list(tblog.rgb(r)), dim=2) for r in rows], dim=1)  # (3, H, W)
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(f"{title}: input, then transformer 1, 2, ...", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
