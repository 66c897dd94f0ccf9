"""Where finished co-localisation runs' crops sit against the digits: per run and split, iou50,
the crops' mean offset from the digits' centres and its spread (px of the 84x84 canvas), and the
iou50 the crops would score with their mean offset removed (docs/coloc.md: a biased objective
gives offset crops; crops split between two places spread wide).

    python scripts/coloc_offsets.py outputs/paper_coloc/coloc_t/digit*/seed0 > offsets.csv
"""

import argparse

import torch

from stnbench import rundir
from stnbench.tasks import coloc

PX = 42  # pixels per unit of the 84x84 canvas's normalised coordinates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished task=coloc run folders")
    args = parser.parse_args()
    print("data,digit,seed,split,iou50,dx,dy,sd_dx,sd_dy,iou50_offset_removed,scale")
    for folder in args.runs:
        cfg, model, _ = rundir.trained_model(folder)
        for split, (x, box) in coloc.splits(cfg, "cpu").items():
            with torch.no_grad():
                p = model.transformer.params(x)
            off = (p[:, 1:] - (box[:, :2] + box[:, 2:]) / 2) * PX  # (N, 2) px
            moved = torch.cat([p[:, :1], p[:, 1:] - off.mean(0) / PX], dim=1)
            (dx, dy), (sx, sy) = off.mean(0).tolist(), off.std(0).tolist()
            hit, unbiased = (100 * coloc.found(q, box).float().mean() for q in (p, moved))
            print(f"{cfg.data.name},{cfg.data.digit},{cfg.seed},{split},{hit:.0f},{dx:.1f},"
                  f"{dy:.1f},{sx:.1f},{sy:.1f},{unbiased:.0f},{p[:, 0].mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
