"""Finding learning rates: stnbench-lr-find's range test and the Optuna search (hparams_search)."""

import json

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_sweeps import cli

from stnbench import models, report
from stnbench.lr_find import grid_distance, suggest
from stnbench.search import objective
from stnbench.tasks import classify

TINY = [
    "data=plain",
    "data.train_size=2000",
    "train.batch_size=32",
    "train.val_size=300",
]


@pytest.mark.slow
def test_lr_find_writes_its_csv_and_png_and_suggests(bin_dir, tmp_path, mnist_root):
    r = cli(bin_dir, tmp_path, "stnbench-lr-find", *TINY, "model=st_fcn", "lr_find.steps=40",
            "lr_find.start=1e-3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("suggested lr: ")
    suggested = float(last.removeprefix("suggested lr: "))
    (folder,) = {p.parent for p in (tmp_path / "outputs" / "lr_find").rglob("lr_find.csv")}
    frame = pd.read_csv(folder / "lr_find.csv")
    assert list(frame.columns) == ["step", "lr", "loss", "smoothed_loss", "grid_distance"]
    assert frame.lr.iloc[0] == pytest.approx(1e-3) and frame.lr.is_monotonic_increasing
    assert frame.lr.diff().iloc[1:].gt(0).all()
    assert frame.lr.min() < suggested < frame.lr.max()
    assert frame.lr.sub(suggested).abs().min() < 0.01 * suggested  # one of the lrs tried
    # the loss fell where the suggestion is (a classifier that learns from 2000 digits)
    at = frame.smoothed_loss[frame.lr.sub(suggested).abs().idxmin()]
    assert at < frame.loss.iloc[0]
    assert frame.grid_distance.iloc[0] < 0.05  # the localisation net starts at the identity
    png = matplotlib.image.imread(folder / "lr_find.png")
    assert png.shape[0] > 300 and png.shape[1] > 300


@pytest.mark.slow
def test_lr_find_on_a_diverging_range_stops_early_in_one_line(bin_dir, tmp_path, mnist_root):
    r = cli(bin_dir, tmp_path, "stnbench-lr-find", *TINY, "model=fcn", "lr_find.start=10",
            "lr_find.end=1e6", "lr_find.steps=60")  # fmt: skip
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("stnbench-lr-find: error: no suggestion")
    (csv,) = (tmp_path / "outputs" / "lr_find").rglob("lr_find.csv")
    assert len(pd.read_csv(csv)) < 60  # stopped once the loss diverged


@pytest.mark.slow
def test_lr_find_refuses_bad_settings_in_one_line(bin_dir, tmp_path):
    r = cli(bin_dir, tmp_path, "stnbench-lr-find", "lr_find.start=1", "lr_find.end=0.1")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == "stnbench-lr-find: error: lr_find.end must be a number > lr_find.start (1.0); got 0.1"
    )
    assert not (tmp_path / "outputs").exists()


def test_the_suggestion_is_the_steepest_fall_and_stays_below_the_collapse():
    lr = np.logspace(-4, 1, 51)
    loss = 2.3 - 2 / (1 + (lr / 1e-2) ** -3)  # falls fastest at 1e-2 against log lr
    frame = pd.DataFrame({"lr": lr, "loss": loss, "smoothed_loss": loss})
    f = OmegaConf.create({"collapse": 0.5})
    assert suggest(frame, f)["suggested_lr"] == pytest.approx(1e-2)
    assert suggest(frame, f)["collapse_lr"] is None
    # the localisation net runs away from 4e-3 (lr[16]): averaged over 5 steps, past 0.5 at the
    # 3rd lr, below the loss's steepest fall, so the suggestion moves below the collapse
    frame["grid_distance"] = np.where(lr >= lr[16], 1.0, 0.0)
    found = suggest(frame, f)
    assert found["collapse_lr"] == pytest.approx(lr[18])
    assert lr[5] <= found["suggested_lr"] < lr[18]
    # a loss that never falls below the untrained model's: no suggestion
    rising = frame.assign(smoothed_loss=2.3 + lr, loss=2.3 + lr)
    assert suggest(rising, f)["suggested_lr"] is None


def test_an_untrained_transformer_is_at_distance_0_from_the_identity():
    net = models.build("st_cnn", "affine", 28)
    assert grid_distance(net.transformer, torch.rand(8, 1, 28, 28)) == 0.0


def test_a_trial_that_did_not_end_ok_counts_as_chance():
    cfg = OmegaConf.create({"optimized_metric": "best_val_error", "task": {"name": "classify"}})
    assert objective(cfg, {"status": "ok", "best_val_error": 3.5}) == 3.5
    for metrics in ({"status": "diverged", "best_val_error": None},
                    {"status": "collapsed", "best_val_error": 85.0}, None):  # fmt: skip
        assert objective(cfg, metrics) == classify.METRIC.chance == 90.0


@pytest.mark.slow
def test_optuna_search_survives_diverging_trials_and_reports_the_best(
    bin_dir, tmp_path, mnist_root
):
    args = [
        "-m", "hparams_search=lr", *TINY, "model=st_fcn", "train.steps=40",
        "train.val_every=40", "schedule=constant", "hydra.sweeper.n_trials=4",
        # the seeded sampler's 4 draws from this range: two near 0.015, which learn, and two
        # above 0.3, which leave the net at chance (collapsed after one validation)
        "optim.lr=tag(log, interval(1e-7, 1e5))", "train.collapse.patience=1",
    ]  # fmt: skip
    r = cli(bin_dir, tmp_path, "stnbench-train", *args)
    assert r.returncode == 0, r.stderr
    sweep = tmp_path / "outputs" / "search" / "lr" / "plain_st_fcn_affine"
    trials = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(trials) == 4 and all(t["searched"] for t in trials)
    statuses = [t["status"] for t in trials]
    assert "ok" in statuses and {"diverged", "collapsed"} & set(statuses), statuses
    assert len({(t["lr"], t["loc_lr_mult"]) for t in trials}) == 4
    found = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(found["best_params"]) == {"optim.lr", "optim.loc_lr_mult"}
    best = min(t["best_val_error"] for t in trials if t["status"] == "ok")
    assert found["best_value"] == best < classify.METRIC.chance
    assert r.stdout.strip().splitlines()[-1].startswith("Best: optim.lr=")
    # rerun: the seeded sampler asks for the same trials, which are finished
    again = cli(bin_dir, tmp_path, "stnbench-train", *args)
    assert again.returncode == 0 and yaml.safe_load(
        (sweep / "optimization_results.yaml").read_text()) == found  # fmt: skip
    assert len(list(sweep.rglob("metrics.json"))) == 4
    # the report: one row of trials, their errors against lr
    runs = report.collect([sweep])
    assert set(runs.row) == {"ST-FCN Aff (searched)"}
    assert not report.warnings(runs)
    written = {p.name for p in report.write(runs, tmp_path)}
    assert {"table.md", "lr.png", "table_lr.md"} <= written


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, error",
    [
        (["optim.momentum=2"], "optim.momentum"),
        # fast_table1 sweeps seeds; a search must not pick the luckiest (data and row are pinned)
        (["experiment=fast_table1", "data=r", "row=cnn"], "hydra.sweeper.params.seed: a search"),
        (["experiment=fast_table1", "data=r", "row=cnn"], "pin it, e.g. seed=0"),
    ],
)
def test_a_search_with_bad_settings_is_refused_before_any_trial(bin_dir, tmp_path, args, error):
    r = cli(bin_dir, tmp_path, "stnbench-train", "-m", "hparams_search=lr", *args)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("stnbench-train: error: ") and error in last
    assert not list(tmp_path.rglob("metrics.json"))
