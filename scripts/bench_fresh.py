"""What fresh draws cost: training throughput on a fixed set against fresh draws every epoch,
in one process, for experiment=paper_fcn's configurations (batch 256).

For each configuration the same model and optimiser train through stnbench.train's own
batches() and train_step(), alternating fixed, fresh, fixed, fresh for --seconds each (so a
drift of the machine falls on both), from the start of an epoch so that the fresh rounds
include the epoch's draw; the report is each regime's best round: img/s, FLOPs per image
(torch's flop counter: matmuls and convolutions; the sampling and the draw's warps count
nothing), the fraction of the fp32 matmul peak (2048^3, measured first), and fresh_cost, the time a
fresh run takes over a fixed one (fixed img/s over fresh img/s).
A quiet machine gives the figures; two jobs beside it halve both.

    python scripts/bench_fresh.py [--seconds 8] [--csv docs/bench_fresh_cpu.csv]
"""

import argparse
import time

import pandas as pd
import torch
from bench_train import flops_per_image, machine  # scripts/, beside this file

from stnbench import allocator
from stnbench.cli import load_config
from stnbench.optim import make_optimizer
from stnbench.tasks import classify
from stnbench.tasks.classify import batches, build_model
from stnbench.tasks.classify import splits as load_splits
from stnbench.train import train_step

CONFIGS = [("r", "st_fcn_aff"), ("r", "fcn"), ("addition", "st_fcn_aff_x2"), ("tc", "st_fcn_aff")]


def rate(cfg, d, model, opt, seconds: float) -> float:
    """Images per second over about ``seconds`` of steps, from step 0 (an epoch's start)."""
    stream, n, b = batches(cfg, d, 0), 0, cfg.train.batch_size
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        train_step(model, opt, *next(stream), classify)
        n += 1
    return n * b / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--csv", default="docs/bench_fresh_cpu.csv")
    args = ap.parse_args()
    allocator.keep_freed_memory()
    dev = torch.device("cpu")
    peak = machine(dev)
    rows = []
    for data, row in CONFIGS:
        base = ["experiment=paper_fcn", f"data={data}", f"row={row}", "seed=0"]
        cfgs = {f: load_config("stnbench_train", [*base, f"data.fresh={f}"]) for f in (False, True)}
        d = load_splits(cfgs[False], dev)  # the fixed training set, val and test
        model = build_model(cfgs[False], dev)
        opt = make_optimizer(model, cfgs[False].optim)
        x, y = next(batches(cfgs[False], d, 0))
        flops = flops_per_image(model, x, y)
        best = {False: 0.0, True: 0.0}
        for fresh in (False, True, False, True):
            best[fresh] = max(best[fresh], rate(cfgs[fresh], d, model, opt, args.seconds))
        for fresh, img_s in best.items():
            cost = round(best[False] / best[True], 3) if fresh else None
            rows.append({"data": data, "row": row, "regime": "fresh" if fresh else "fixed",
                         "img_per_s": round(img_s), "mflop_per_img": round(flops / 1e6, 2),
                         "peak_fraction": round(img_s * flops / 1e9 / peak, 3),
                         "fresh_cost": cost})  # fmt: skip
        print(pd.DataFrame(rows[-2:]).to_string(index=False, header=len(rows) == 2))
    pd.DataFrame(rows).to_csv(args.csv, index=False)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
