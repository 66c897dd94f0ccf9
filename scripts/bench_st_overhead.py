"""The spatial transformer's cost: ST-CNN affine against the CNN of the same canvas, with the
classifier's first convolution as it is now (stnbench.models.FirstConv2d, its input gradient by
matmul + fold) and as it was (nn.Conv2d, oneDNN's backward-data kernel), all in one process.

The three models train in turn through stnbench.train's own step (prepare(): channels_last),
ROUNDS rounds of about SECONDS each (after two warm-up steps) on random images, and the median
rate of each is reported, so a noisy machine slows all three alike. Beside the rates: forward +
backward FLOPs per image (scripts/bench_train.py's counter), GFLOP/s and the fraction of this
machine's fp32 matmul peak.

    python scripts/bench_st_overhead.py [--batch 64] [--canvas 28,42]
"""

import argparse
import functools
import platform
import statistics
import sys
from pathlib import Path

import pandas as pd
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import flops_per_image, matmul_peak, timed_steps  # noqa: E402

from stnbench import models  # noqa: E402
from stnbench.models import prepare  # noqa: E402
from stnbench.train import train_step  # noqa: E402

ROUNDS, SECONDS = 6, 1.0


def build(model: str, canvas: int, torch_first_conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = models.build(model, "affine" if models.is_st(model) else None, canvas)
    if torch_first_conv:  # the first convolution as it was: nn.Conv2d, same weights
        ours = net.classifier[0]
        plain = nn.Conv2d(
            ours.in_channels, ours.out_channels, ours.kernel_size, padding=ours.padding
        )
        plain.load_state_dict(ours.state_dict())
        net.classifier[0] = plain
    return prepare(net, torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--canvas", default="28,42")
    args = ap.parse_args()
    cpu = torch.device("cpu")
    peak = matmul_peak(cpu)
    rows = []
    for canvas in map(int, args.canvas.split(",")):
        nets = {
            "CNN": build("cnn", canvas),
            "ST-CNN, nn.Conv2d first": build("st_cnn", canvas, torch_first_conv=True),
            "ST-CNN, FirstConv2d": build("st_cnn", canvas),
        }
        opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for k, n in nets.items()}
        x = torch.rand(args.batch, 1, canvas, canvas)
        y = torch.randint(0, 10, (args.batch,))
        rates = {k: [] for k in nets}
        for _ in range(ROUNDS):
            for k, net in nets.items():
                step = functools.partial(train_step, net, opts[k], x, y)
                rates[k].append(args.batch * timed_steps(step, SECONDS, cpu))
        base = statistics.median(rates["CNN"])
        for k, net in nets.items():
            rate = statistics.median(rates[k])
            mflop = flops_per_image(net, x, y) / 1e6
            rows.append(
                {
                    "canvas": canvas,
                    "model": k,
                    "train_img_s": round(rate),
                    "vs_cnn": round(rate / base, 2),
                    "mflop_per_image": round(mflop, 2),
                    "gflop_s": round(rate * mflop / 1e3, 1),
                }  # fmt: skip
            )
    peak = max(peak, matmul_peak(cpu))
    table = pd.DataFrame(rows)
    table["peak_fraction"] = (table["gflop_s"] / peak).round(3)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; fp32 "
        f"matmul peak {peak:.0f} GFLOP/s; batch {args.batch}, median of {ROUNDS} rounds of "
        f"{SECONDS:g} s\n"
    )
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
