"""What stnbench.transformer.HalfPool saves: training throughput of experiment=paper_fcn's
pooled configurations (the 2x average pooling after the transformers, on 42x42 and 60x60
canvases) and of ST-CNN on RTS (whose localisation net pools its input too), with every
HalfPool swapped for torch's nn.AvgPool2d(2) and back, in one process.

Both poolings give the same values and gradients bit for bit (tests/test_models.py), so the
two arms train the same model. Each arm runs --seconds of stnbench.train's train_step on
one real batch of the data (256 images), alternating baseline, ours, baseline, ours; the
report is each arm's best round: img/s, FLOPs per image (torch's flop counter: matmuls and
convolutions; pooling and sampling count nothing), the fraction of the fp32 matmul peak
(2048^3, measured first), and speedup (ours over the baseline).

    python scripts/bench_pool.py [--seconds 6] [--csv docs/bench_pool_cpu.csv]
"""

import argparse
import time

import pandas as pd
import torch
from bench_train import flops_per_image, machine  # scripts/, beside this file
from torch import nn

from stnbench import allocator
from stnbench.cli import load_config
from stnbench.optim import make_optimizer
from stnbench.tasks import classify
from stnbench.train import train_step
from stnbench.transformer import HalfPool

CONFIGS = [
    ("paper_fcn", "addition", "st_fcn_aff_x2"),
    ("paper_fcn", "rts", "st_fcn_aff"),
    ("paper_fcn", "tc", "st_fcn_aff"),
    ("fast_table1", "rts", "st_cnn_aff"),
]


def swap(model: nn.Module, to: type) -> None:
    """Replace every 2x average pooling in model by a ``to`` (HalfPool or nn.AvgPool2d(2))."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, HalfPool | nn.AvgPool2d):
                setattr(parent, name, to() if to is HalfPool else to(2))


def rate(model, opt, x, y, seconds: float) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        train_step(model, opt, x, y, classify)
        n += 1
    return n * len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--csv", default="docs/bench_pool_cpu.csv")
    args = ap.parse_args()
    allocator.keep_freed_memory()
    dev = torch.device("cpu")
    peak = machine(dev)
    rows = []
    for experiment, data, row in CONFIGS:
        overrides = [f"experiment={experiment}", f"data={data}", f"row={row}", "seed=0"]
        cfg = load_config("stnbench_train", [*overrides, "train.batch_size=256"])
        model = classify.build_model(cfg, dev)
        opt = make_optimizer(model, cfg.optim)
        x, y = next(classify.batches(cfg, classify.splits(cfg, dev), 0))  # one real batch
        mflop = flops_per_image(model, x, y) / 1e6
        best = {"avg_pool2d": 0.0, "HalfPool": 0.0}
        for arm in ["avg_pool2d", "HalfPool"] * 2:
            swap(model, HalfPool if arm == "HalfPool" else nn.AvgPool2d)
            rate(model, opt, x, y, 1.0)  # warm-up
            best[arm] = max(best[arm], rate(model, opt, x, y, args.seconds))
        for arm, ips in best.items():
            speedup = round(ips / best["avg_pool2d"], 3) if arm == "HalfPool" else None
            rows.append({"data": data, "row": row, "pool": arm, "img_per_s": round(ips),
                         "mflop_per_img": round(mflop, 2),
                         "peak_fraction": round(ips * mflop / 1e3 / peak, 3),
                         "speedup": speedup})  # fmt: skip
        print(pd.DataFrame(rows[-2:]).to_string(index=False, header=len(rows) == 2))
    pd.DataFrame(rows).to_csv(args.csv, index=False)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
