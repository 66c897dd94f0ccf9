"""Throughput of stnbench.geometry's grid + sampler, forward and backward, per kind and canvas.

Baseline in the same process: torch's own F.affine_grid + F.grid_sample on the same batch, so the
ratio survives a noisy machine. Sampling is memory-bound and torch.utils.flop_counter counts no
FLOPs for grid_sample, so the figure reported is images per second, with the measured fp32 matmul
peak printed for context.

    python scripts/bench_geometry.py [--batch 256] [--repeats 20] [--csv out.csv]
"""

import argparse
import time

import pandas as pd
import torch
import torch.nn.functional as F

from stnbench import geometry


def timed(fn, repeats: int) -> float:
    """Best seconds per call over ``repeats`` calls, after two warm-up calls."""
    fn()
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / timed(lambda: a @ b, repeats) / 1e9


def step(warp, x, p):
    x.grad = p.grad = None
    warp(x, p).sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fp32 matmul peak {matmul_gflops():.0f} GFLOP/s"
    )

    rows = []
    for size in (28, 42, 60):
        x = torch.rand(args.batch, 1, size, size, requires_grad=True)
        theta = geometry.identity("affine").repeat(args.batch, 1).requires_grad_(True)

        def baseline(x, p):
            g = F.affine_grid(p.view(-1, 2, 3), list(x.shape), align_corners=False)
            return F.grid_sample(x, g, align_corners=False)

        base = timed(lambda: step(baseline, x, theta), args.repeats)  # noqa: B023
        for kind in geometry.KINDS:
            p = geometry.identity(kind) + 0.01 * torch.randn(geometry.num_params(kind))
            p = p.repeat(args.batch, 1).requires_grad_(True)
            t = timed(lambda: step(lambda x, p: geometry.warp(x, kind, p), x, p), args.repeats)  # noqa: B023
            rows.append(
                {
                    "canvas": size,
                    "kind": kind,
                    "images_per_s": round(args.batch / t),
                    "baseline_images_per_s": round(args.batch / base),
                    "ratio_to_baseline": round(base / t, 2),
                }
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
