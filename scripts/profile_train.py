"""Where a training step's time goes: torch.profiler over stnbench.train's own step.

    python scripts/profile_train.py cnn 28            # model, canvas
    python scripts/profile_train.py st_cnn 42 --transform affine --batch 256

Prints the top operators by self CPU time, grouped into convolution, matmul, sampling and the
rest, for the rows of scripts/bench_train.py that run far below the matmul peak.
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from stnbench import allocator, models
from stnbench.models import prepare
from stnbench.tasks import classify
from stnbench.train import train_step

GROUPS = {
    "convolution": ("conv", "mkldnn", "onednn"),
    "matmul": ("addmm", "mm", "bmm", "matmul", "linear"),
    "sampling": ("grid_sampler",),
    "pooling": ("pool",),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("canvas", type=int)
    ap.add_argument("--transform", default="affine")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    allocator.keep_freed_memory()
    torch.manual_seed(0)
    kind = args.transform if models.is_st(args.model) else None
    net = prepare(models.build(args.model, kind, args.canvas), torch.device("cpu"))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(args.batch, 1, args.canvas, args.canvas)
    y = torch.randint(0, 10, (args.batch,))
    for _ in range(3):
        train_step(net, opt, x, y, classify)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            train_step(net, opt, x, y, classify)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    shares = dict.fromkeys([*GROUPS, "other"], 0.0)
    for e in events:
        group = next(
            (g for g, keys in GROUPS.items() if any(k in e.key.lower() for k in keys)), "other"
        )
        shares[group] += e.self_cpu_time_total / total
    print(
        f"{args.model} {kind or ''} {args.canvas}x{args.canvas}, batch {args.batch}: "
        f"{total / args.steps / 1e3:.1f} ms per step (self CPU time)"
    )
    print("  " + ", ".join(f"{g} {s:.0%}" for g, s in shares.items()))
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]:
        print(
            f"  {e.self_cpu_time_total / total:6.1%}  {e.key}  ({e.count // args.steps} calls/step)"
        )


if __name__ == "__main__":
    main()
