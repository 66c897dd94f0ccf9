"""Wall time of a learning-rate sweep under each launcher a CPU user has: Hydra's sequential
one (hydra/launcher=basic, one process, one job after another, all cores for each), Hydra's
joblib launcher with 2 jobs at once (hydra/launcher=joblib hydra.launcher.n_jobs=2: joblib's loky
workers each get cores // n_jobs threads through OMP_NUM_THREADS, so 1 each on 2 cores), and
stnbench's default (no override: joblib with one job per core, the jobs left over by the last
full round in fewer workers with more threads, a last single one in-process with every core), on
R (28x28) and RTS (42x42). --lrs takes the first N of the 8 learning rates (3 for a sweep whose
count the 2 cores do not divide). (docs/bench_sweep_cpu.csv also holds the vectorised launcher's
figures, measured before it was removed.)

Each job: the configured model, the first 10k training images, STEPS steps of batch 64, lr from
LRS, validation every STEPS/2 steps on 2,000 images, test on all 10k: the whole command is timed,
start-up, data, evaluation and writing included, as a researcher waits for it. Beside the wall
times: training images per second of the whole sweep, forward + backward FLOPs per image
(torch's flop counter, as scripts/bench_train.py), the sweep's GFLOP/s and its fraction of this
machine's fp32 matmul peak, measured in this process before and after (the higher).

    python scripts/bench_sweep.py [--device cpu] [--model st_cnn] [--steps 200] [--data r,rts]
        [--lrs 8] [--csv docs/bench_sweep_cpu.csv] [--append]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import flops_per_image, matmul_peak  # noqa: E402

from stnbench import data, device, models  # noqa: E402
from stnbench.models import prepare  # noqa: E402

LRS = "0.002,0.003,0.005,0.007,0.01,0.015,0.02,0.03"
BATCH, TRAIN_SIZE, VAL_SIZE = 64, 10000, 2000
BIN = Path(sys.executable).parent / "stnbench-train"


def job_args(data_name: str, model: str, steps: int, dev: str) -> list[str]:
    return [
        f"data={data_name}",
        f"model={model}",
        f"device={dev}",
        f"data.train_size={TRAIN_SIZE}",
        f"train.steps={steps}",
        f"train.batch_size={BATCH}",
        f"train.val_every={max(steps // 2, 1)}",
        f"train.val_size={VAL_SIZE}",
        "train.progress=false",
        "schedule=cosine",
    ]


def timed(command: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def statuses(folder: Path) -> str:
    found = [json.loads(p.read_text())["status"] for p in folder.rglob("metrics.json")]
    return f"{found.count('ok')}/{len(found)} ok"


def sweep(data_name: str, model: str, steps: int, lrs: str, dev: str, tmp: Path) -> list[dict]:
    args = job_args(data_name, model, steps, dev)
    out = []
    launchers = {
        "sequential (basic)": ["hydra/launcher=basic"],
        "joblib, 2 jobs x 1 thread": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
        "default (stnbench)": [],
    }
    for mode, launcher in launchers.items():
        cwd = tmp / f"{data_name}_{model}_{len(lrs.split(','))}_{mode.split()[0].strip(',')}"
        cwd.mkdir()
        seconds = timed([str(BIN), "-m", *args, f"optim.lr={lrs}", *launcher], cwd)
        out.append(
            {
                "data": data_name,
                "model": model,
                "jobs": len(lrs.split(",")),
                "mode": mode,
                "seconds": seconds,
                "runs": statuses(cwd),
            }  # fmt: skip
        )
        print(f"{data_name} {model} {mode}: {seconds:.1f} s ({out[-1]['runs']})", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="st_cnn")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--data", default="r,rts")
    parser.add_argument("--lrs", type=int, default=8, help="the first N learning rates")
    parser.add_argument("--csv", type=Path)
    parser.add_argument("--append", action="store_true", help="add to --csv's rows")
    args = parser.parse_args()
    dev = device.resolve(args.device)
    peak = matmul_peak(dev)
    lrs = ",".join(LRS.split(",")[: args.lrs])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.data.split(","):
            data.load(name, "train")  # built and cached before any timing
            rows += sweep(name, args.model, args.steps, lrs, args.device, Path(tmp))
    peak = max(peak, matmul_peak(dev))
    n_lrs = len(lrs.split(","))
    table = pd.DataFrame(rows)
    for name in table["data"].unique():
        canvas = data.recipe(name).canvas if data.recipe(name) else 28
        torch.manual_seed(0)
        net = prepare(models.build(args.model, "affine", canvas), dev)
        x = torch.rand(BATCH, 1, canvas, canvas, device=dev)
        y = torch.randint(0, 10, (BATCH,), device=dev)
        mflop = flops_per_image(net, x, y) / 1e6
        sel = table["data"] == name
        images = n_lrs * args.steps * BATCH
        table.loc[sel, "mflop_per_image"] = round(mflop, 2)
        table.loc[sel, "train_img_s"] = (images / table.loc[sel, "seconds"]).round(0)
        table.loc[sel, "gflop_s"] = (table.loc[sel, "train_img_s"] * mflop / 1e3).round(1)
        base = table.loc[sel & (table["mode"] == "sequential (basic)"), "seconds"].item()
        table.loc[sel, "speedup"] = (base / table.loc[sel, "seconds"]).round(2)
    table["peak_fraction"] = (table["gflop_s"] / peak).round(3)
    table["peak_gflop_s"] = round(peak)
    table["seconds"] = table["seconds"].round(1)
    print(
        f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"{dev}; fp32 matmul peak {peak:.0f} GFLOP/s; {n_lrs} lrs x {args.steps} steps of "
        f"{BATCH} per sweep; {os.cpu_count()} CPUs\n"
    )
    print(table.to_string(index=False))
    if args.csv:
        if args.append and args.csv.exists():
            table = pd.concat([pd.read_csv(args.csv), table], ignore_index=True)
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
