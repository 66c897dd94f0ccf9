"""Three ways to choose a learning rate, side by side on one training setup (issue 16): a grid
sweep, the range test (stnbench-lr-find) and an Optuna search (hparams_search=lr).

For each case (data x row) every method runs the same budget through the console scripts as a
user would, and is timed end to end (start-up, data and evaluation included):

- grid: ``stnbench-train -m ... optim.lr=<GRID>``; its pick is the lr with the lowest best
  validation error;
- range test: ``stnbench-lr-find ...``, then one run at the suggested lr (a suggestion is worth
  the run it gives); beside it the grid's error at the grid lr nearest the suggestion;
- Optuna: ``stnbench-train -m hparams_search=lr ... hydra.sweeper.n_trials=<TRIALS>`` (for ST
  models it also searches optim.loc_lr_mult), only for the cases given with --optuna.

Every run is ``experiment=<EXPERIMENT>`` with data, row and seed pinned and ``train.steps``
set, so the three methods see one configuration. Writes a CSV, a row per case and method:
seconds, runs, the lr picked and its best validation error.

    python scripts/lr_compare.py --cases r:cnn,r:st_cnn_aff,rts:cnn,rts:st_cnn_aff
        [--optuna r:st_cnn_aff] [--steps 500] [--out outputs/lr_compare]
        [--csv docs/lr_compare_cpu.csv]
"""

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from stnbench import report

BIN = Path(sys.executable).parent
GRID = "0.01,0.02,0.05,0.1,0.2,0.5"


def run(argv: list[str]) -> tuple[float, str]:
    """Run a console script; its wall seconds and its stdout (it must succeed)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def best(folder: Path) -> pd.Series:
    """The run below ``folder`` with the lowest best validation error (failed runs count as
    chance, as the search counts them)."""
    runs = report.collect([folder])
    runs["chosen_by"] = runs.best_val_error.where(runs.status == "ok", 90.0).fillna(90.0)
    return runs.sort_values("chosen_by").iloc[0]


def compare(case: str, args, optuna: bool) -> list[dict]:
    name, row = case.split(":")
    pinned = [f"experiment={args.experiment}", f"data={name}", f"row={row}", "seed=0",
              f"train.steps={args.steps}"]  # fmt: skip
    out = Path(args.out) / f"{name}_{row}"
    rows = []

    # one job after another, as the search's trials (hydra.sweeper.n_jobs: 1) and as measured
    seconds, _ = run([BIN / "stnbench-train", "-m", *pinned, f"optim.lr={args.grid}",
                      "hydra/launcher=basic", f"hydra.sweep.dir={out / 'grid'}"])  # fmt: skip
    grid = report.collect([out / "grid"])
    pick = best(out / "grid")
    rows.append({"method": "grid", "seconds": seconds, "runs": len(grid), "lr": float(pick.lr),
                 "best_val_error": float(pick.best_val_error)})  # fmt: skip

    seconds, stdout = run([BIN / "stnbench-lr-find", *pinned, f"hydra.run.dir={out / 'lr_find'}"])
    suggested = float(stdout.strip().splitlines()[-1].split(":")[-1])
    more, _ = run([BIN / "stnbench-train", *pinned, f"optim.lr={suggested:.4g}",
                   f"hydra.run.dir={out / 'suggested'}"])  # fmt: skip
    nearest = grid.iloc[(grid.lr.map(math.log) - math.log(suggested)).abs().argsort()[:1]]
    rows.append({"method": "range test + 1 run", "seconds": seconds + more, "runs": 1,
                 "lr": suggested, "best_val_error": float(best(out / "suggested").best_val_error),
                 "range_test_seconds": seconds,
                 "grid_error_at_nearest_lr": float(nearest.best_val_error.iloc[0])})  # fmt: skip

    if optuna:
        search = out / "optuna"
        trials = f"hydra.sweeper.n_trials={args.trials}"
        seconds, _ = run([BIN / "stnbench-train", "-m", "hparams_search=lr", *pinned, trials,
                          f"hydra.sweep.dir={search}"])  # fmt: skip
        found = OmegaConf.load(search / "optimization_results.yaml")
        pick = best(search)
        rows.append({"method": f"optuna ({args.trials} trials)", "seconds": seconds,
                     "runs": args.trials, "lr": found["best_params"]["optim.lr"],
                     "loc_lr_mult": found["best_params"].get("optim.loc_lr_mult"),
                     "best_val_error": float(pick.best_val_error)})  # fmt: skip
    for r in rows:
        r.update(data=name, row=row, steps=args.steps)
        print(
            f"{name} {row} {r['method']}: {r['seconds']:.0f} s, lr {r['lr']:.3g}, best val "
            f"{r['best_val_error']:.2f}%",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="r:cnn,r:st_cnn_aff,rts:cnn,rts:st_cnn_aff",
                    help="data:row pairs (rows from conf/row)")  # fmt: skip
    ap.add_argument("--optuna", default="r:st_cnn_aff", help="the cases Optuna searches too")
    ap.add_argument("--experiment", default="fast_table1")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--grid", default=GRID)
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--out", default="outputs/lr_compare")
    ap.add_argument("--csv", default="docs/lr_compare_cpu.csv")
    args = ap.parse_args()
    optuna = set(filter(None, args.optuna.split(",")))
    rows = [r for case in args.cases.split(",") for r in compare(case, args, case in optuna)]
    frame = pd.DataFrame(rows)
    first = ["data", "row", "method", "seconds", "runs", "lr", "best_val_error"]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    frame.to_csv(args.csv, index=False, float_format="%.4g")
    print(frame.to_string(index=False))
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
