"""Training and evaluation throughput of every model per canvas, against this machine's matmul
peak and a plain baseline loop, all in one process.

For fcn, cnn, st_fcn and st_cnn (affine, tps) on canvases 28, 42 and 60:

- train img/s through stnbench.train's own code: prepare() (channels_last), train_step(), data on
  the device, batches by index, glibc keeping freed memory (stnbench.allocator); batch 256;
- eval img/s through stnbench.tasks.classify.evaluate, batch 1000;
- FLOPs per image, forward + backward, from torch.utils.flop_counter (convolutions and matmuls;
  grid_sample, pooling and elementwise ops count nothing), the achieved GFLOP/s, and its fraction
  of the fp32 matmul peak (2048^3) measured at the start and the end of this run (the higher);
- the same model trained by a plain loop: a DataLoader over a TensorDataset, batch 64, NCHW,
  eager, glibc's default allocator; and our speed-up over it.

Then stnbench-train end to end (train(), its default logging on) for ST-CNN affine on RTS at
batch 256, read from its metrics.json. Random images of the canvas size stand in for data in the
table (speed does not depend on pixel values); the end-to-end run uses the real RTS set.

    python scripts/bench_train.py [--seconds 3] [--csv docs/bench_train_cpu.csv]
"""

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from stnbench import allocator, device, models
from stnbench.cli import load_config
from stnbench.models import prepare
from stnbench.tasks import classify
from stnbench.tasks.classify import evaluate
from stnbench.train import train, train_step

ROWS = [
    ("fcn", None),
    ("cnn", None),
    ("st_fcn", "affine"),
    ("st_fcn", "tps"),
    ("st_cnn", "affine"),
    ("st_cnn", "tps"),
]
CANVASES = (28, 42, 60)
BATCH, BASELINE_BATCH, EVAL_BATCH = 256, 64, 1000


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dev, n=2048, repeats=10) -> float:
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    best = float("inf")
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def machine(dev) -> float:
    """Measure the fp32 matmul peak (GFLOP/s), print it with the machine, and return it."""
    peak = matmul_peak(dev)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {dev}; fp32 matmul peak {peak:.0f} GFLOP/s",
          flush=True)  # fmt: skip
    return peak


def timed_steps(step, seconds, dev) -> float:
    """Steps per second of ``step`` over about ``seconds``, after two warm-up steps."""
    step()
    step()
    sync(dev)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        step()
        n += 1
    sync(dev)
    return n / (time.perf_counter() - t)


def flops_per_image(net, x, y) -> float:
    """Forward + backward FLOPs per image (convolutions and matmuls; torch's flop counter)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops() / len(x)


def fresh(model_name, kind, canvas, dev, ours: bool):
    torch.manual_seed(0)
    net = models.build(model_name, kind, canvas)
    net = prepare(net, dev) if ours else net.to(dev)
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)


def row(model_name, kind, canvas, dev, seconds) -> dict:
    g = torch.Generator().manual_seed(0)
    n = 8 * BATCH
    x = torch.rand(n, 1, canvas, canvas, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)

    # ours: the trainer's own step on device-resident data, batches by index
    allocator.keep_freed_memory()
    net, opt = fresh(model_name, kind, canvas, dev, ours=True)
    xd, yd = x.to(dev), y.to(dev)
    order = torch.randperm(n, generator=g).to(dev)
    at = [0]

    def ours():
        idx = order[at[0] : at[0] + BATCH]
        at[0] = (at[0] + BATCH) % n
        train_step(net, opt, xd[idx], yd[idx], classify)

    train_ips = timed_steps(ours, seconds, dev) * BATCH
    flops = flops_per_image(net, xd[:BATCH], yd[:BATCH])
    net.eval()
    sync(dev)
    t = time.perf_counter()
    evaluate(net, xd[:2000], yd[:2000], EVAL_BATCH)
    sync(dev)
    eval_ips = 2000 / (time.perf_counter() - t)

    # the plain baseline: DataLoader, batch 64, NCHW, eager, glibc's default allocator
    allocator.restore()
    base, base_opt = fresh(model_name, kind, canvas, dev, ours=False)
    loader = iter(())
    dataset = TensorDataset(x, y)

    def baseline():
        nonlocal loader
        batch = next(loader, None)
        if batch is None:
            loader = iter(DataLoader(dataset, batch_size=BASELINE_BATCH, shuffle=True))
            batch = next(loader)
        xb, yb = batch[0].to(dev), batch[1].to(dev)
        loss = F.cross_entropy(base(xb), yb)
        base_opt.zero_grad()
        loss.backward()
        base_opt.step()

    base_ips = timed_steps(baseline, seconds, dev) * BASELINE_BATCH
    allocator.keep_freed_memory()
    return {
        "model": model_name,
        "transform": kind or "-",
        "canvas": canvas,
        "mflop_per_image": round(flops / 1e6, 2),
        "train_img_s": round(train_ips),
        "train_gflop_s": round(train_ips * flops / 1e9, 1),
        "eval_img_s": round(eval_ips),
        "baseline_img_s": round(base_ips),
        "speedup": round(train_ips / base_ips, 2),
    }


def end_to_end(dev, steps: int) -> dict:
    """stnbench-train's own loop for ST-CNN affine on RTS, batch 256, default logging."""
    cfg = load_config(
        "stnbench_train",
        [
            "data=rts",
            "model=st_cnn",
            "transform=affine",
            f"train.steps={steps}",
            "train.val_size=2000",
            f"device={dev.type}",
        ],
    )
    with tempfile.TemporaryDirectory() as out:
        return train(cfg, Path(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--e2e-steps", type=int, default=120)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    dev = device.resolve(args.device)
    allocator.keep_freed_memory()
    t0 = time.perf_counter()
    peak_start = machine(dev)
    rows = []
    for canvas in CANVASES:
        for model_name, kind in ROWS:
            rows.append(row(model_name, kind, canvas, dev, args.seconds))
            print(rows[-1], flush=True)
    e2e = end_to_end(dev, args.e2e_steps)
    peak_end = matmul_peak(dev)
    peak = max(peak_start, peak_end)
    table = pd.DataFrame(rows)
    table["peak_fraction"] = (table.train_gflop_s / peak).round(3)
    print(f"\nfp32 matmul peak: {peak_start:.0f} GFLOP/s at the start, {peak_end:.0f} at the end")
    print(table.to_string(index=False))
    target = table[
        (table["model"] == "st_cnn") & (table["transform"] == "affine") & (table["canvas"] == 42)
    ]
    flops = target.mflop_per_image.item() * 1e6
    ips = e2e["images_per_second"]
    print(
        f"\nstnbench-train end to end, ST-CNN affine on RTS, batch 256, {e2e['steps']} steps: "
        f"{ips:.0f} img/s = {ips * flops / 1e9:.1f} GFLOP/s = {ips * flops / 1e9 / peak:.1%} "
        f"of the matmul peak; {ips / target.baseline_img_s.item():.2f}x the baseline loop"
    )
    print(f"benchmark wall time {time.perf_counter() - t0:.0f} s")
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
