"""stnbench-report on hand-made run folders: every status shown, lr chosen on validation, the
paper's numbers, warnings, bad input. (test_sweeps.py checks it against real runs.)"""

import json
import math
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from stnbench import curves, report, rundir, tblog
from stnbench.cli import load_config
from stnbench.errors import StnbenchError


def run_folder(root, name, status="ok", test=None, val=None, **settings):
    """A run folder as stnbench-train leaves it: metrics.json and Hydra's .hydra/."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    m = {
        "status": status,
        "test_error": test,
        "val_error": val,
        "data": "rts",
        "model": "st_cnn",
        "transform": "affine",
        "residual": False,
        "tanh": False,
        "lr": 0.01,
        "seed": 0,
        "optim": "sgd",
        "planned_steps": 100,
        **settings,
    }
    if m["model"] in ("fcn", "cnn"):
        m.update(transform=None, residual=None, tanh=None)
    (folder / "metrics.json").write_text(json.dumps(m))
    return folder


def md_rows(text):
    """A Markdown table's rows as lists of cell texts (tabulate pads the cells to line up)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.fixture
def runs(tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "a", test=1.0, val=1.5, seed=0)
    run_folder(r, "b", test=2.0, val=2.5, seed=1)
    run_folder(r, "c", "collapsed", test=88.0, val=88.5, seed=2)
    run_folder(r, "d", "diverged", seed=3)
    run_folder(r, "e", "failed", seed=4)
    (r / "f" / ".hydra").mkdir(parents=True)  # started, never finished
    cfg = load_config("stnbench_train", ["seed=5"])  # the config Hydra saves for a job
    OmegaConf.save(cfg, r / "f" / ".hydra" / "config.yaml")
    run_folder(r, "g", test=3.0, val=3.0, model="cnn")
    run_folder(r, "h", test=4.0, val=4.0, model="cnn", data="r")
    unreadable(r / "i", ["seed=6"])
    return r


def unreadable(folder, overrides):
    """A run whose metrics.json was cut short; its Hydra config says which cell it belongs to."""
    (folder / ".hydra").mkdir(parents=True)
    cfg = load_config("stnbench_train", overrides)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    (folder / "metrics.json").write_text('{"status": "ok"')


def test_cells_count_every_status_and_average_the_ok_runs(runs):
    table = report.cells(report.collect([runs]))
    cell = table[(table.row == "ST-CNN Aff") & (table["data"] == "rts")].iloc[0]
    assert cell["mean"] == 1.5 and cell["std"] == pytest.approx(math.sqrt(0.5)) and cell.n == 2
    assert (cell.collapsed, cell.diverged, cell.failed, cell.unfinished, cell.unreadable) == (
        1,
        1,
        1,
        1,
        1,
    )
    assert cell.paper == 0.5 and cell["diff"] == pytest.approx(1.0)
    text = report.markdown(table)
    flags = "[1 collapsed, 1 diverged, 1 failed, 1 unfinished, 1 unreadable]"
    assert f"1.50 ± 0.71 (2) {flags}" in text
    missing = table[(table.row == "ST-CNN Aff") & (table["data"] == "r")].iloc[0]
    assert missing.n == 0 and ["ST-CNN Aff", "missing", "0.7", ""] in [r[:4] for r in md_rows(text)]
    assert list(dict.fromkeys(table.row)) == ["CNN", "ST-CNN Aff"]  # the paper's order
    assert list(dict.fromkeys(table["data"])) == ["r", "rts"]


def test_cells_flag_dead_transformers(tmp_path):
    r = tmp_path / "runs"
    for seed, dead in enumerate((True, False, None)):  # None: a run from before the measure
        run_folder(r, f"s{seed}", test=1.0, val=1.0, seed=seed, transformer_dead=dead)
    cell = report.cells(report.collect([r])).iloc[0]
    assert cell.dead == 1 and cell.n == 3
    assert "1.00 ± 0.00 (3) [1 dead transformer]" in report.markdown(
        report.cells(report.collect([r]))
    )


def test_csv_reads_back_in_the_papers_layout(runs, tmp_path):
    report.write(report.collect([runs]), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table.csv", index_col=0)
    assert list(table.index) == ["CNN", "ST-CNN Aff"]
    assert table.loc["CNN", "R"] == 4.0 and table.loc["CNN", "R paper"] == 1.2
    assert table.loc["ST-CNN Aff", "RTS n"] == 2
    assert (
        table.loc["ST-CNN Aff", "RTS not ok"]
        == "1 collapsed, 1 diverged, 1 failed, 1 unfinished, 1 unreadable"
    )
    assert math.isnan(table.loc["ST-CNN Aff", "R"])
    runs_csv = pd.read_csv(tmp_path / "out" / "runs.csv")
    assert len(runs_csv) == 9 and set(runs_csv.status) == set(report.STATUSES) - {"inconsistent"}
    assert not (tmp_path / "out" / "lr.png").exists()  # one learning rate: no lr plot


def test_addition_runs_make_the_a1_column_beside_the_papers(tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "rts", test=1.0, val=1.0)  # Table 1 alongside
    for name, model, n, err in (("fcn", "fcn", 1, 40.0), ("st1", "st_fcn", 1, 20.0),
                                ("st2", "st_fcn", 2, 8.0)):  # fmt: skip
        run_folder(r, name, test=err, val=err, data="addition", model=model, transformers=n)
    report.write(report.collect([r]), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "table.csv", index_col=0)
    assert list(table.index) == ["FCN", "ST-FCN Aff", "2xST-FCN Aff", "ST-CNN Aff"]
    assert table.loc["2xST-FCN Aff", "Addition"] == 8.0
    assert table.loc["2xST-FCN Aff", "Addition paper"] == 5.8
    assert table.loc["FCN", "Addition paper"] == 47.7 and table.loc["ST-CNN Aff", "RTS"] == 1.0


def test_the_lr_is_chosen_on_validation_and_a_diverged_lr_counts_as_100(tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "low", test=5.0, val=6.0, lr=0.001)
    run_folder(r, "mid", test=9.0, val=2.0, lr=0.01)  # worse on test, better on validation
    run_folder(r, "high", "diverged", lr=0.1)
    runs = report.collect([r])
    cell = report.cells(runs).iloc[0]
    assert cell.lr == 0.01 and cell["mean"] == 9.0 and cell.lrs == 3 and cell.diverged == 0
    per_lr = report.by_lr(runs)
    assert per_lr.set_index("lr").loc[0.1, "score"] == 100.0
    written = {p.name for p in report.write(runs, tmp_path / "out")}
    assert {"table_lr.md", "table_lr.csv", "lr.png"} <= written
    lr_md = (tmp_path / "out" / "table_lr.md").read_text()
    assert ["ST-CNN Aff", "5.00 (1)", "9.00 (1) *", "no ok run [1 diverged]"] in md_rows(lr_md)


def test_rows_for_variants_and_other_columns():
    assert report.row_label("st_cnn", "tps") == "ST-CNN TPS"
    assert report.row_label("cnn", None) == "CNN"
    assert report.row_label("st_fcn", "attention") == "ST-FCN Att"
    assert report.row_label("st_cnn", "affine", residual=True) == "ST-CNN Aff (residual)"
    assert report.row_label("st_cnn", "affine", residual=True, tanh=True) == "ST-CNN Aff (tanh)"
    slow_loc = report.row_label("st_cnn", "affine", residual=True, loc_lr_mult=0.1)
    assert slow_loc == "ST-CNN Aff (residual, loc lr x0.1)"
    assert report.row_label("cnn", None, loc_lr_mult=0.1) == "CNN"  # no localisation net
    assert report.row_label("st_cnn", "affine", multi=True) == "ST-CNN Aff (multi)"


def test_a_localisation_lr_multiplier_is_a_row_of_its_own(tmp_path):
    """Runs that differ in loc_lr_mult are different models: never averaged into one cell."""
    r = tmp_path / "runs"
    run_folder(r, "a", test=1.0, val=1.0, loc_lr_mult=1.0)
    run_folder(r, "b", test=3.0, val=3.0, loc_lr_mult=0.1)
    run_folder(r, "c", test=5.0, val=5.0)  # written before loc_lr_mult was recorded
    table = report.cells(report.collect([r])).set_index("row")
    assert table.loc["ST-CNN Aff", "n"] == 2 and table.loc["ST-CNN Aff", "mean"] == 3.0
    assert table.loc["ST-CNN Aff (loc lr x0.1)", "mean"] == 3.0
    assert table.loc["ST-CNN Aff (loc lr x0.1)", "n"] == 1


def test_one_protocols_multiplier_marks_no_row(tmp_path):
    """Where every run of a model trains its localisation net at 0.2x, that is the protocol, like
    its lr: the row keeps the paper's name and number."""
    r = tmp_path / "runs"
    for seed in (0, 1):
        run_folder(r, f"s{seed}", test=1.0, val=1.0, loc_lr_mult=0.2, seed=seed)
    run_folder(r, "cnn", test=2.0, val=2.0, loc_lr_mult=0.2, model="cnn", transform=None)
    table = report.cells(report.collect([r])).set_index("row")
    assert set(table.index) == {"ST-CNN Aff", "CNN"} and table.loc["ST-CNN Aff", "n"] == 2


def test_a_searchs_trials_are_rows_of_their_own_and_leave_the_grids_labels(tmp_path):
    grid, search = tmp_path / "grid", tmp_path / "search"
    for seed in (0, 1):
        run_folder(grid, f"s{seed}", test=1.0, val=1.0, loc_lr_mult=0.2, seed=seed)
    run_folder(grid, "cnn", test=2.0, val=2.0, model="cnn")
    for i, (lr, mult) in enumerate([(0.01, 0.5), (0.1, 0.05)]):
        run_folder(search, f"st{i}", test=3.0, val=3.0, lr=lr, loc_lr_mult=mult, searched=True)
        run_folder(search, f"cnn{i}", test=4.0, val=4.0, lr=lr, model="cnn", searched=True)
    rows = set(report.collect([grid, search]).row)
    assert rows == {"ST-CNN Aff", "CNN", "ST-CNN Aff (searched)", "CNN (searched)"}
    assert rows - {"ST-CNN Aff (searched)", "CNN (searched)"} == set(report.collect([grid]).row)


def test_a_budget_unlike_the_papers_is_named_beside_its_number(tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "a", test=1.0, val=1.0, planned_steps=2500, batch_size=64)
    run_folder(r, "b", test=1.0, val=1.0, planned_steps=150_000, batch_size=256, data="r")
    table = report.cells(report.collect([r]))
    rows = md_rows(report.markdown(table))
    assert rows[0][1:] == ["R", "R paper", "R diff", "RTS", "RTS paper", "RTS diff"]
    assert rows[2][2] == "0.7" and rows[2][5] == "0.5"  # the paper's number, alone
    assert rows[2][4] == "1.00 (1); 2,500 steps of 64"  # how ours trained, beside ours


def test_the_data_regime_is_in_the_table_and_mixed_regimes_are_warned_about(tmp_path):
    r = tmp_path / "runs"
    paper = {"planned_steps": 150_000, "batch_size": 256}
    run_folder(r, "a", test=1.0, val=1.0, fresh=True, **paper)
    run_folder(r, "b", test=1.0, val=1.0, fresh=True, seed=1, **paper)
    run_folder(r, "c", test=1.0, val=1.0, data="r", model="cnn", **paper)  # before data.fresh
    runs = report.collect([r])
    table = report.cells(runs)
    rows = md_rows(report.markdown(table))
    assert rows[2][2] == "1.2" and rows[3][5] == "0.5"
    assert rows[3][4] == "1.00 ± 0.00 (2); fresh draws"
    wide = report.wide(table)
    assert (wide.loc["CNN", "R data"], wide.loc["ST-CNN Aff", "RTS data"]) == (
        "fixed set", "fresh draws"
    )  # fmt: skip
    assert report.warnings(runs) == []
    # a model with runs in both regimes: the fixed set's are a row of their own, never pooled
    run_folder(r, "d", test=2.0, val=1.0, data="r", model="cnn", fresh=True, seed=1, **paper)
    runs = report.collect([r])
    assert dict(zip(runs.path.str[-1], runs.row, strict=True)) == {
        "a": "ST-CNN Aff", "b": "ST-CNN Aff", "c": "CNN (fixed set)", "d": "CNN"
    }  # fmt: skip
    assert report.warnings(runs) == []


def test_a_configuration_in_several_folders_is_counted_once(tmp_path):
    """Two spellings of one run (row=cnn, model=cnn), a copy of a sweep: one row of runs.csv,
    n = 1, and a warning naming the folder set aside and the one kept (the finished one)."""
    from stnbench.cli import load_config
    from stnbench.config import recorded

    def spelled(root, name, *overrides, status="ok", test=5.0, lr=0.01):
        folder = run_folder(root, name, status, test=test, val=5.0, model="cnn", lr=lr)
        cfg = load_config("stnbench_train", ["data=rts", *overrides])
        (folder / "config.json").write_text(json.dumps(recorded(OmegaConf.to_container(cfg))))
        return folder

    spelled(tmp_path / "a", "model=cnn", "model=cnn")
    spelled(tmp_path / "a", "row=cnn", "row=cnn", "optim=sgd", test=7.0)  # its copy, edited
    spelled(tmp_path / "b", "row=cnn", "row=cnn", status="failed", test=None)
    spelled(tmp_path / "a", "lr", "model=cnn", "optim.lr=0.02", test=6.0, lr=0.02)  # another
    runs = report.collect([tmp_path / "a", tmp_path / "b"])
    assert sorted(runs.path.str.split("/").str[-1]) == ["lr", "model=cnn"]
    kept = tmp_path / "a" / "model=cnn"
    assert sorted(runs.attrs["duplicates"]) == [
        f"{tmp_path / 'a' / 'row=cnn'}: the same configuration as {kept}; set aside, counted once",
        f"{tmp_path / 'b' / 'row=cnn'}: the same configuration as {kept}; set aside, counted once",
    ]
    assert set(runs.attrs["duplicates"]) <= set(report.warnings(runs))
    cell = report.cells(runs).set_index("row").loc["CNN"]
    assert (cell.n, cell["mean"]) == (1, 5.0)  # the other lr is its own option, not a seed


def test_a_result_that_disagrees_with_itself_is_inconsistent_never_a_result(tmp_path):
    from stnbench.rundir import digest

    r = tmp_path / "runs"
    good = run_folder(r, "good", test=2.0, val=2.0, best_test_error=2.5, best_step=50, steps=100)
    edited = run_folder(r, "edited", test=2.0, val=2.0, best_test_error=2.5, best_step=50,
                        steps=100, seed=1)  # fmt: skip
    for folder in (good, edited):
        m = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**m, "digest": digest(m)}))
    m = json.loads((edited / "metrics.json").read_text())
    (edited / "metrics.json").write_text(json.dumps({**m, "test_error": 0.5}))  # by hand
    run_folder(
        r, "unsealed", test=0.4, val=2.0, best_test_error=2.5, best_step=100, steps=100, seed=2
    )  # fmt: skip  (the final model is the best, with another test error)
    runs = report.collect([r])
    assert sorted(runs.status) == ["inconsistent", "inconsistent", "ok"]
    cell = report.cells(runs).iloc[0]
    assert (cell.n, cell["mean"], cell.inconsistent) == (1, 2.0, 2)
    assert "2.00 (1) [2 inconsistent]" in report.markdown(report.cells(runs))
    lines = [w for w in report.warnings(runs) if "inconsistent" in w]
    assert len(lines) == 2 and any("do not match their digest" in w for w in lines)


def test_mixed_budgets_are_warned_about(tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "a", test=1.0, val=1.0, planned_steps=100)
    run_folder(r, "b", test=1.0, val=1.0, planned_steps=200, seed=1)
    (warning,) = report.warnings(report.collect([r]))
    assert warning == "ST-CNN Aff on rts: runs differ in planned_steps (100, 200)"


def test_a_folder_where_no_run_has_finished_is_a_table_of_unfinished_runs(bin_dir, tmp_path):
    """Just after a sweep starts, or after a Ctrl-C in its first round: the count, no traceback."""
    folder = run_folder(tmp_path / "runs", "a")
    (folder / "metrics.json").unlink()
    from stnbench.cli import load_config

    OmegaConf.save(load_config("stnbench_train", ["model=cnn"]), folder / ".hydra" / "config.yaml")
    r = run_cli(bin_dir, str(tmp_path / "runs"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "1 runs (1 unfinished)" in r.stdout and "[1 unfinished]" in r.stdout


def run_cli(bin_dir, *args):
    command = [str(bin_dir / "stnbench-report"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_bad_input_is_one_line_exit_2_and_no_table(bin_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    bad = run_folder(tmp_path / "bad", "x")
    (bad / "metrics.json").write_text('{"status": "ok"')  # cut short, and no Hydra config
    cases = [
        (
            (str(tmp_path / "nowhere"),),
            "nowhere: no such folder (expected a folder of runs, or a runs.csv it wrote)",
        ),
        ((str(tmp_path / "empty"),), "no readable runs below"),
        ((str(tmp_path / "bad"),), "x/metrics.json: unreadable (JSONDecodeError: Expecting"),
    ]
    for args, message in cases:
        r = run_cli(bin_dir, *args, "--out", str(tmp_path / "out"))
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("stnbench-report: error: ") and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    with pytest.raises(StnbenchError, match="no such folder"):
        report.collect([tmp_path / "nowhere"])


@pytest.mark.slow
def test_an_unreadable_run_is_skipped_named_and_counted_and_the_exit_says_so(bin_dir, tmp_path):
    r = tmp_path / "runs"
    run_folder(r, "a", test=1.0, val=1.0)
    unreadable(r / "b", ["seed=1"])  # its cell known from its Hydra config
    (r / "c").mkdir()
    (r / "c" / "metrics.json").write_text("[1, 2]")  # not even that
    out = tmp_path / "out"
    result = run_cli(bin_dir, str(r), "--out", str(out))
    assert result.returncode == 1, result.stderr
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("stnbench-report: warning: ") for w in warnings)
    assert "b/metrics.json: unreadable (JSONDecodeError: " in warnings[0]
    assert "c/metrics.json: unreadable (not an object); skipped" in warnings[1]
    assert "1.00 (1) [1 unreadable]" in (out / "table.md").read_text()
    assert set(pd.read_csv(out / "runs.csv").status) == {"ok", "unreadable"}


def test_runs_trained_before_the_loc_lr_fix_are_warned_about(tmp_path):
    """A model with several transformers whose metrics.json does not say that every one got
    loc_lr_mult's share was trained with the others at the full lr (before commit 666d9d5)."""
    r = tmp_path / "runs"
    kw = dict(test=1.0, val=1.0, loc_lr_mult=0.2, model="st_fcn")
    run_folder(r, "old", transformers=2, **kw)
    run_folder(r, "new", transformers=2, seed=1, data="r", loc_lr_every_transformer=True, **kw)
    run_folder(r, "one", **kw)  # one transformer: it always got its share
    run_folder(r, "multi", model="st_cnn", multi=True, loc_lr_mult=0.2, test=1.0, val=1.0)
    warnings = report.warnings(report.collect([r]))
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("2xST-FCN Aff on rts: 1 runs trained before commit 666d9d5")
    assert warnings[1].startswith("ST-CNN Aff (multi) on rts: 1 runs trained before commit")


@pytest.mark.parametrize("tag", tblog.VAL_ERROR)
def test_curves_read_the_validation_error_under_its_tag_and_the_older_one(tmp_path, tag):
    """Runs written before the error curves were renamed (val/error) still draw their curves."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as writer:
        for step, value in [(50, 60.0), (100, 30.0)]:
            writer.add_scalar(tag, value, step)
            writer.add_scalar("time/seconds", step / 10, step)
    frame = curves.events(tmp_path)
    assert frame.to_dict("list") == {"step": [50, 100], "val_error": [60.0, 30.0],
                                     "seconds": [5.0, 10.0]}  # fmt: skip


def test_a_run_resumed_across_the_rename_draws_one_whole_curve(tmp_path):
    """A run begun under val/error and resumed (from step 100) under error/val wrote both tags
    in two event files: its curve is both, the resumed values where both hold a step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path, filename_suffix=".a") as writer:
        for step in (50, 100, 150):  # killed after 150, resumed from the checkpoint at 100
            writer.add_scalar(tblog.VAL_ERROR[1], 60.0 - step / 10, step)
            writer.add_scalar("time/seconds", step / 10, step)
    time.sleep(1.1)  # event files are named, and so read, by the second they were opened in
    with SummaryWriter(tmp_path, purge_step=101, filename_suffix=".b") as writer:
        for step in (150, 200):
            writer.add_scalar(tblog.VAL_ERROR[0], 40.0 - step / 10, step)
            writer.add_scalar("time/seconds", step / 10, step)
    frame = curves.events(tmp_path)
    assert frame.to_dict("list") == {"step": [50, 100, 150, 200], "val_error": [55.0, 50.0, 25.0,
                                     20.0], "seconds": [5.0, 10.0, 15.0, 20.0]}  # fmt: skip


def logged_run(root, name, seed, values):
    """A finished run folder whose validation curve (one point every 100 steps) is ``values``."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run_folder(root, name, test=values[-1], val=values[-1], seed=seed, batch_size=64)
    with SummaryWriter(folder) as writer:
        for i, value in enumerate(values, 1):
            writer.add_scalar(tblog.VAL_ERROR[0], value, 100 * i)
            writer.add_scalar("time/seconds", 10.0 * i + seed, 100 * i)
    return folder


def test_a_runs_csv_brings_its_curves_pooled_with_new_runs(tmp_path):
    """A committed folder's runs.csv, reported again beside a new seed's run folder, draws the
    curves that reporting every run folder draws: n, mean, std, min, max and seconds pooled."""
    old, new = tmp_path / "session1" / "sweep", tmp_path / "session2" / "sweep"
    logged_run(old, "s0", 0, [50.0, 20.0, 10.0])
    logged_run(old, "s1", 1, [40.0, 30.0, 4.0])
    logged_run(new, "s2", 2, [45.0, 26.0, 7.0])
    every = curves.read(report.collect([old, new]))
    first = tmp_path / "first"
    report.write(report.collect([old]), first)
    pooled = curves.read(report.collect([first / "runs.csv", new]))
    assert curves.committed(report.collect([first / "runs.csv"]))[1] == []
    assert pooled.n.tolist() == every.n.tolist() == [3, 3, 3]
    columns = ["images", "seconds", "mean", "std", "min", "max"]
    pd.testing.assert_frame_equal(pooled[columns], every[columns], check_dtype=False)
    alone = curves.read(report.collect([first / "runs.csv"]))  # one source: as written
    report.write(report.collect([first / "runs.csv", new]), tmp_path / "merged")
    merged = pd.read_csv(tmp_path / "merged" / "runs.csv")  # the runs.csv's columns, in order
    assert list(merged.columns) == list(pd.read_csv(first / "runs.csv").columns)
    assert merged.seed.tolist() == [0, 1, 2]
    assert alone.drop(columns="lr").equals(pd.read_csv(first / "curves.csv").drop(columns="lr"))


def test_a_runs_csv_curve_of_other_runs_is_left_out_with_a_line(tmp_path):
    """A curves.csv line that averages more runs than its runs.csv has finished (a run edited
    out, or set aside as another's duplicate) is not drawn, and the report says so."""
    root = tmp_path / "runs"
    logged_run(root, "s0", 0, [50.0, 20.0])
    logged_run(root, "s1", 1, [40.0, 30.0])
    first = tmp_path / "first"
    report.write(report.collect([root]), first)
    table = pd.read_csv(first / "runs.csv")
    table[table.seed == 0].to_csv(first / "runs.csv", index=False)
    runs = report.collect([first / "runs.csv"])
    assert curves.read(runs).empty
    (line,) = curves.committed(runs)[1]
    assert line.endswith("ST-CNN Aff on rts (runs, lr 0.01) averages 2 runs, 1 of them here; "
                         "its curve left out"), line  # fmt: skip
    assert line in report.warnings(runs)


RESULTS = Path(__file__).resolve().parents[1] / "outputs" / "results"


@pytest.mark.parametrize(
    "folder", sorted(p.parent.relative_to(RESULTS) for p in RESULTS.rglob("table.csv")), ids=str
)
def test_every_committed_table_is_what_its_runs_csv_makes(folder, tmp_path):
    """Each committed results folder's tables (table.*, and table_lr.* where lrs differ) are
    stnbench-report's, today, of its runs.csv, and no other: every configuration counted once
    (no two of its runs share an identity) and each cell as committed (the tables were rebuilt
    this way when the layout last changed)."""
    runs = report.collect([RESULTS / folder / "runs.csv"])
    assert runs.attrs["duplicates"] == []
    assert not runs.identity.dropna().duplicated().any()
    # most committed runs.csv predate the identity column: no two runs share every setting
    recorded = {**rundir.settings(load_config("stnbench_train", [])),  # every task's settings
                **rundir.settings(load_config("stnbench_train", ["experiment=paper_coloc",
                                                                 "data.digit=0"]))}  # fmt: skip
    settings = [k for k in recorded if k in runs and k != "torch"]
    assert not runs[settings].astype(str).duplicated().any()
    tables = {p.name for p in report.write(runs, tmp_path) if p.stem.startswith("table")}
    assert {"table.csv", "table.md"} <= tables
    assert {p.name for p in (RESULTS / folder).glob("table*")} == tables  # none stale
    for name in tables:
        assert (tmp_path / name).read_text() == (RESULTS / folder / name).read_text(), name
    written, committed = (
        pd.read_csv(tmp_path / "runs.csv"),
        pd.read_csv(RESULTS / folder / "runs.csv"),
    )
    assert list(written.columns[: len(committed.columns)]) == list(committed.columns)  # then new
    pd.testing.assert_frame_equal(written[committed.columns], committed)  # every run as recorded
    if (RESULTS / folder / "curves.csv").is_file():  # the curves survive, from their curves.csv
        committed = (RESULTS / folder / "curves.csv").read_text()
        assert (tmp_path / "curves.csv").read_text() == committed


def test_a_runs_csv_that_is_not_a_reports_is_one_line(tmp_path):
    bad = tmp_path / "runs.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(StnbenchError, match=r"runs.csv: no status, data, model, lr, seed, path "
                       r"column \(expected a runs.csv that stnbench-report wrote\)"):  # fmt: skip
        report.collect([bad])
