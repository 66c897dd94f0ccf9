"""stnbench-analyse pose|attention|boxes DIR [DIR ...]: what a sweep's spatial transformers
learned (stnbench.analysis), read from its run folders as stnbench-report reads them."""

import argparse
import sys
from pathlib import Path

from stnbench.cli import run

PROG = "stnbench-analyse"


def main() -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    pose = sub.add_parser(
        "pose",
        help="on R or RTS: the transformers' last logged images (PNG) and the pose of the digit "
        "in their outputs over the test set against the input's (CSV)",
    )
    attention = sub.add_parser(
        "attention",
        help="on addition: the share of each transformer's output ink from the first digit "
        "(CSV), and 8 test images through each transformer (PNG)",
    )
    boxes = sub.add_parser(
        "boxes",
        help="on co-localisation: where each run's crops sit against the digits, per split "
        "(CSV), and test images per class with the digit's box and the crop (PNG)",
    )
    for p in (pose, attention, boxes):
        p.add_argument("dirs", nargs="+", metavar="DIR", help="folders of runs")
        p.add_argument("--seed", type=int, default=0, help="whose runs the PNG shows")
    pose.add_argument("--data", default="rts", help="the distortion: affine, no clutter (r, rts)")
    for p, png, csv in ((pose, "<data>_transformer_outputs.png", "<data>_pose.csv"),
                        (attention, "attention.png", "attention.csv"),
                        (boxes, "boxes.png", "offsets.csv")):  # fmt: skip
        p.add_argument("--png", type=Path, help=f"default: DIR/report/{png}")
        p.add_argument("--csv", type=Path, help=f"default: DIR/report/{csv}")
    args = parser.parse_args()

    def body() -> None:
        from stnbench import analysis

        out = Path(args.dirs[0]) / "report"
        if args.what == "pose":
            png = args.png or out / f"{args.data}_transformer_outputs.png"
            csv = args.csv or out / f"{args.data}_pose.csv"
            table = analysis.pose_table(args.dirs, args.data, args.seed, png, csv)
            means = table.groupby("row", sort=False).mean(numeric_only=True).drop(columns="seed")
            print(means.round(3).to_string())
        elif args.what == "boxes":
            png, csv = args.png or out / "boxes.png", args.csv or out / "offsets.csv"
            print(analysis.boxes(args.dirs, args.seed, png, csv).round(1).to_string(index=False))
        else:
            png, csv = args.png or out / "attention.png", args.csv or out / "attention.csv"
            table = analysis.attention_table(args.dirs, args.seed, png, csv)
            print(table.round(3).to_string(index=False))
        print(f"wrote {csv}, {png}")

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
