"""Sweeps through the CLI (the default launcher, Hydra's sequential one and submitit's local
executor), the experiment configs, and stnbench-report's tables checked against the runs' own
metrics.json."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import joblib
import pandas as pd
import pytest
import torch
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.stnbench_launcher.local_launcher import NOT_STARTED, STOPPED, default_jobs
from PIL import Image

from stnbench import report
from stnbench.cli import load_config
from stnbench.cli import train as cli_train
from stnbench.models import MODELS, is_st
from stnbench.train import train

TINY = [
    "data=plain",
    "data.train_size=2000",
    "train.steps=60",
    "train.batch_size=64",
    "train.val_every=30",
    "train.val_size=500",
    "train.log_every=20",
    "schedule=constant",
]
SWEEP = ["-m", "model=cnn,st_cnn", "optim.lr=0.01,0.02", *TINY]  # ST-CNN collapses at 0.03


def cli(bin_dir, cwd, name, *args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [str(bin_dir / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def metrics_below(folder):
    return {
        p.parent.relative_to(folder).as_posix(): json.loads(p.read_text())
        for p in folder.rglob("metrics.json")
    }


@pytest.fixture(scope="module")
def sweep(mnist_root, bin_dir, tmp_path_factory):
    """A real tiny sweep (2 models x 2 learning rates) through the CLI, then stnbench-report."""
    tmp = tmp_path_factory.mktemp("sweep")
    r = cli(bin_dir, tmp, "stnbench-train", *SWEEP, "hydra.sweep.dir=runs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 jobs: 4 ok" in r.stdout and "stnbench-report runs" in r.stdout
    rep = cli(bin_dir, tmp, "stnbench-report", "runs", "--out", "tables")
    assert rep.returncode == 0, rep.stderr[-3000:]
    return tmp, r, rep


@pytest.mark.slow
def test_sweep_jobs_get_readable_folders_of_their_own(sweep):
    tmp, _, _ = sweep
    runs = metrics_below(tmp / "runs")
    rest = ",schedule=constant,train.batch_size=64,train.log_every=20,train.steps=60,"
    rest += "train.val_every=30,train.val_size=500"
    assert sorted(runs) == [
        f"plain_{model}/seed0/data.train_size=2000,optim.lr={lr}{rest}"
        for model in ("cnn", "st_cnn_affine")  # a folder names a transform only if it has one
        for lr in ("0.01", "0.02")
    ]
    for folder, m in runs.items():
        assert m["status"] == "ok" and m["test_error"] < 60, folder  # chance is 90%
        assert f"optim.lr={m['lr']}," in folder and f"_{m['model']}" in folder


@pytest.mark.slow
def test_report_numbers_are_the_runs_numbers(sweep):
    tmp, _, rep = sweep
    runs = metrics_below(tmp / "runs")
    out = tmp / "tables"
    assert {p.name for p in out.iterdir()} == {
        "table.csv", "table.md", "table.tex", "runs.csv",
        "table_lr.csv", "table_lr.md", "lr.png", "curves.csv", "curves.png",
    }  # fmt: skip
    per_lr = pd.read_csv(out / "table_lr.csv")
    table = pd.read_csv(out / "table.csv", index_col=0)
    assert list(table.index) == ["CNN", "ST-CNN Aff"]
    for row, model in (("CNN", "cnn"), ("ST-CNN Aff", "st_cnn")):
        mine = {m["lr"]: m for m in runs.values() if m["model"] == model}
        for lr, m in mine.items():
            hit = per_lr[(per_lr.row == row) & (per_lr.lr == lr)]
            assert len(hit) == 1 and hit.n.item() == 1
            assert hit["mean"].item() == pytest.approx(m["test_error"])
        chosen = min(mine.values(), key=lambda m: (m["val_error"], m["lr"]))  # on validation
        assert table.loc[row, "plain"] == pytest.approx(chosen["test_error"])
        assert table.loc[row, "plain lr"] == chosen["lr"]
        assert table.loc[row, "plain n"] == 1 and math.isnan(table.loc[row, "plain paper"])
        assert f"{chosen['test_error']:.2f} (1) @ lr {chosen['lr']:g}" in rep.stdout
    assert len(pd.read_csv(out / "runs.csv")) == 4
    with Image.open(out / "lr.png") as png:
        assert png.format == "PNG" and png.width > 300


@pytest.mark.slow
def test_curves_are_the_runs_validations(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _, _ = sweep
    frame = pd.read_csv(tmp / "tables" / "curves.csv")
    assert set(frame.protocol) == {"runs"} and set(frame["row"]) == {"CNN", "ST-CNN Aff"}
    for folder, m in metrics_below(tmp / "runs").items():
        events = EventAccumulator(str(tmp / "runs" / folder))
        events.Reload()
        val = {e.step: e.value for e in events.Scalars("error/val")}
        assert sorted(val) == [30, 60]
        row = "CNN" if m["model"] == "cnn" else "ST-CNN Aff"
        mine = frame[(frame.row == row) & (frame.lr == m["lr"])].set_index("step")
        for step, error in val.items():  # a line per (row, lr): one run, its own values
            assert mine.loc[step, "mean"] == pytest.approx(error)
            assert mine.loc[step, "images"] == step * 64
    assert (frame.seconds > 0).all() and (frame.n == 1).all()  # one seed per (row, lr)
    assert len(frame) == 4 * 2  # 2 rows x 2 lrs, never pooled, x 2 validations
    with Image.open(tmp / "tables" / "curves.png") as png:
        assert png.format == "PNG" and png.height > 300


@pytest.mark.slow
def test_report_markdown_and_booktabs(sweep):
    tmp, _, _ = sweep
    text = (tmp / "tables" / "table.md").read_text()
    assert "mean ± std over the runs that ended ok" in text  # the legend below the table
    md = [line for line in text.splitlines() if line.startswith("|")]
    assert len(md) == 4
    head = [c.strip() for c in md[0].strip("|").split("|")]
    assert head == ["model", "plain", "plain paper", "plain diff"]
    assert re.fullmatch(r"\|:?-+\|(-+:\|){3}", md[1])  # numbers right-aligned
    assert all(line.count("|") == md[0].count("|") for line in md)  # a well-formed table
    tex = (tmp / "tables" / "table.tex").read_text()
    for command in (r"\begin{tabular}{lrrr}", r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(command) == 1, command
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert [line.split(" & ")[0] for line in body] == ["CNN", "ST-CNN Aff"]
    assert all(line.count(" & ") == 3 and line.endswith(r"\\") for line in body)


@pytest.mark.slow
def test_submitit_local_executor_gives_the_same_layout(sweep, bin_dir):
    tmp, _, _ = sweep
    r = cli(bin_dir, tmp, "stnbench-train", *SWEEP, "hydra.sweep.dir=cluster",
            "hydra/launcher=submitit_local")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    default, cluster = metrics_below(tmp / "runs"), metrics_below(tmp / "cluster")
    assert sorted(cluster) == sorted(default)
    for folder, m in cluster.items():
        assert m["status"] == "ok", folder
        if folder.startswith("plain_cnn/"):  # another thread count: see the test below
            assert m["test_error"] == pytest.approx(default[folder]["test_error"], abs=2.0)
    assert list((tmp / "cluster" / ".submitit").iterdir())  # it went through submitit
    # the jobs ran in submitit's processes; the summary counts them from what they returned
    assert f"stnbench-train: {len(cluster)} jobs: {len(cluster)} ok" in r.stdout
    rep = cli(bin_dir, tmp, "stnbench-report", "cluster")
    assert rep.returncode == 0 and (tmp / "cluster" / "report" / "table.md").exists()


@pytest.mark.slow
def test_the_sequential_launcher_gives_the_same_results(sweep, bin_dir):
    """The fixture's sweep ran under the default launcher (two joblib workers on a CPU-only
    machine); hydra/launcher=basic runs the same jobs one by one in this process."""
    tmp, _, _ = sweep
    r = cli(bin_dir, tmp, "stnbench-train", *SWEEP, "hydra.sweep.dir=one_by_one",
            "hydra/launcher=basic")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Launching 4 jobs locally" in r.stdout  # Hydra's sequential launcher's own line
    one_by_one, default = metrics_below(tmp / "one_by_one"), metrics_below(tmp / "runs")
    assert f"stnbench-train: {len(one_by_one)} jobs: {len(one_by_one)} ok" in r.stdout
    assert sorted(one_by_one) == sorted(default)
    assert {m["threads"] for m in one_by_one.values()} == {torch.get_num_threads()}
    workers = default_jobs()
    if workers > 1 and 4 % workers == 0:  # the default ran the 4 jobs in full rounds
        assert {m["threads"] for m in default.values()} == {joblib.cpu_count() // workers}
    for folder, m in one_by_one.items():  # the CNNs agree; an ST-CNN next to collapse need not
        if folder.startswith("plain_cnn/"):
            assert m["test_error"] == pytest.approx(default[folder]["test_error"], abs=2.0)


@pytest.mark.parametrize(
    "jobs, workers, expected",
    [
        (4, 2, [("side by side", 2, 4)]),
        (3, 2, [("side by side", 2, 2), ("here", 1, 1)]),  # the last job alone, every core
        (7, 4, [("side by side", 4, 4), ("side by side", 3, 3)]),
        (1, 2, [("here", 1, 1)]),
        (3, 1, [("here", 1, 3)]),  # a GPU machine: one by one
        (2, 8, [("side by side", 2, 2)]),
    ],
)
def test_the_default_launcher_fills_every_core(monkeypatch, jobs, workers, expected):
    from hydra_plugins.stnbench_launcher.local_launcher import LocalLauncher

    ran = []

    def record(how):
        def launch(self, overrides, first, workers=1):
            assert first == sum(n for *_, n in ran)  # each job keeps its index in the sweep
            ran.append((how, workers, len(overrides)))
            return [f"job {first + i}" for i in range(len(overrides))]

        return launch

    monkeypatch.setattr(LocalLauncher, "side_by_side", record("side by side"))
    monkeypatch.setattr(LocalLauncher, "one_by_one", record("here"))
    returns = LocalLauncher(n_jobs=workers).launch([[f"seed={i}"] for i in range(jobs)], 0)
    assert ran == expected and returns == [f"job {i}" for i in range(jobs)]


def test_the_default_launcher_runs_one_job_per_core_without_a_gpu(monkeypatch):
    from hydra_plugins.stnbench_launcher import local_launcher

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(joblib, "cpu_count", lambda: 16)
    for gib, jobs in [(64, 16), (8, 4), (1, 1)]:  # 2 GiB a worker
        monkeypatch.setattr(local_launcher, "memory", lambda gib=gib: gib * 2**30)
        assert local_launcher.default_jobs() == jobs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_launcher.default_jobs() == 1  # a GPU holds one run at a time


@pytest.mark.parametrize(
    "values, said",
    [
        (
            [{"status": "ok"}, {"status": "failed"}],
            "sweep interrupted after its 2 running jobs had",
        ),
        (
            [{"status": "ok"}, STOPPED, NOT_STARTED],
            "sweep interrupted: of its 3 jobs, 1 ended (each job's line above says how), 1 "
            "stopped mid-run after saving a checkpoint (each job's line says at which step), 1 "
            "never started: rerun the same command to resume",
        ),
    ],
    ids=["after every job ended", "while one ran"],
)
def test_a_signal_in_a_round_stops_the_sweep_and_says_what_it_stopped(
    tmp_path, monkeypatch, values, said
):
    """A SIGTERM while a round of jobs runs side by side ends the sweep (exit 130) and says what
    became of each job: ended (its metrics), stopped with a checkpoint (STOPPED) or never
    started (NOT_STARTED); where every job had ended, it says so."""
    from hydra_plugins.stnbench_launcher import local_launcher
    from omegaconf import OmegaConf

    from stnbench.errors import Interrupted

    def round_then_signal(n_jobs):
        def run(jobs):
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while (
                not local_launcher.stop_mark().exists()
            ):  # the launcher's handler marks the sweep stopped
                assert time.time() < deadline, "the signal did not mark the sweep stopped"
                time.sleep(0.01)
            return [JobReturn(status=JobStatus.COMPLETED, _return_value=v) for v in values]

        return run

    monkeypatch.setattr(joblib, "Parallel", round_then_signal)
    monkeypatch.setattr(local_launcher, "configure_log", lambda *args: None)
    launcher = local_launcher.LocalLauncher(n_jobs=2)
    hydra = {"sweep": {"dir": str(tmp_path)}, "hydra_logging": {}, "verbose": False}
    launcher.setup(
        hydra_context=None, task_function=None, config=OmegaConf.create({"hydra": hydra})
    )
    with pytest.raises(Interrupted, match=re.escape(said)):
        launcher.side_by_side([["seed=0"], ["seed=1"]], 0, 2)


def test_a_sweep_whose_returns_were_lost_says_its_jobs_saved_their_checkpoints():
    from hydra_plugins.stnbench_launcher.local_launcher import interrupted_line

    assert interrupted_line(None) == (
        "sweep interrupted; its running jobs saved their checkpoints: rerun the same command to "
        "resume"
    )
    failed = JobReturn(status=JobStatus.FAILED, _return_value=None)
    line = interrupted_line([failed, JobReturn(status=JobStatus.COMPLETED, _return_value=STOPPED)])
    assert line.startswith("sweep interrupted: of its 2 jobs, 1 ended (each job's line above")


def test_jobs_that_ran_elsewhere_are_counted_from_what_they_returned(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    (tmp_path / "metrics.json").write_text(json.dumps({"status": "collapsed"}))
    where = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    returns = [
        JobReturn(status=JobStatus.COMPLETED, _return_value={"status": "ok"}),
        JobReturn(status=JobStatus.COMPLETED, _return_value=None),  # refused
        JobReturn(status=JobStatus.COMPLETED, _return_value=90.0, hydra_cfg=where),  # a trial
    ]
    monkeypatch.setattr(cli_train, "OUTCOMES", cli_train.collections.Counter())
    cli_train.count_returns(returns)
    assert cli_train.OUTCOMES == {"ok": 1, "skipped": 1, "collapsed": 1}


def test_a_crashing_job_is_recorded_and_the_sweep_goes_on(mnist_root, tmp_path, monkeypatch):
    import stnbench.train

    def fake_train(cfg, out, progress=False, stop=None):
        if cfg.optim.lr == 0.2:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return {"status": "diverged" if cfg.optim.lr == 0.3 else "ok", "test_error": None}

    monkeypatch.setattr(stnbench.train, "train", fake_train)
    monkeypatch.setattr(cli_train, "OUTCOMES", cli_train.collections.Counter())
    argv = [
        "stnbench-train",
        "-m",
        "optim.lr=0.1,0.2,0.3",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
        "hydra/launcher=basic",
    ]  # fmt: skip  (in this process, where the fake train is)
    monkeypatch.setattr(sys, "argv", argv)
    assert cli_train.main() == 1  # a failed job makes the exit status non-zero
    assert cli_train.OUTCOMES == {"ok": 1, "failed": 1, "diverged": 1}
    (folder, failed), *others = metrics_below(tmp_path).items()  # the fake writes nothing
    assert not others and folder.startswith("plain_st_cnn_affine/seed0/") and "lr=0.2" in folder
    assert failed["status"] == "failed" and "CUDA out of memory" in failed["reason"]
    assert failed["lr"] == 0.2 and failed["model"] == "st_cnn" and failed["test_error"] is None


def test_a_failed_run_is_retried(mnist_root, tmp_path):
    cfg = load_config("stnbench_train", [*TINY, "model=fcn", "train.steps=30"])
    from stnbench.rundir import record_failure

    record_failure(cfg, tmp_path, MemoryError("out of memory"))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    m = train(cfg, tmp_path)
    assert m["status"] == "ok" and json.loads((tmp_path / "metrics.json").read_text()) == m


# --- experiment configs -------------------------------------------------------------------------


def jobs(*overrides):
    """Every job's overrides of a sweep, expanded as stnbench's sweeper expands them (an
    experiment's hydra.sweeper.params and grids first, then the command line's, which replace
    them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.stnbench_launcher.checked_sweeper import expand

    fixed = [o for o in overrides if "," not in o]
    sweeper = load_config("stnbench_train", fixed, with_hydra=True).hydra.sweeper
    params, grids = sweeper.params or {}, sweeper.get("grids")
    parsed = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + list(overrides)
    )
    (batch,) = expand(grids or [{}], parsed)
    return batch


def test_paper_table1_is_every_cell_once():
    batch = jobs("experiment=paper_table1")
    assert len(batch) == 4 * 8 * 3
    cells = set()
    for overrides in batch[::7]:  # composing all 96 takes a while; every 7th covers each key
        cfg = load_config("stnbench_train", overrides)
        assert cfg.train.steps == 150_000 and cfg.train.batch_size == 256
        assert cfg.optim.lr == 0.01 and cfg.schedule.name == "step"
        cells.add((cfg.data.name, cfg.model.name, cfg.transform.kind, cfg.seed))
    assert len(cells) == len(batch[::7])
    rows = {o.split("=")[1] for j in batch for o in j if o.startswith("row=")}
    labels = set()
    for row in rows:
        cfg = load_config("stnbench_train", [f"row={row}"])
        kind = cfg.transform.kind if is_st(cfg.model.name) else None
        labels.add(report.row_label(cfg.model.name, kind))
    # Table 1's rows, every registered model with each of the paper's three kinds
    table1 = {report.row_label(m, t) for m in MODELS
              for t in (("affine", "projective", "tps") if is_st(m) else (None,))}  # fmt: skip
    assert labels == table1
    assert table1 <= set(report.PAPER)  # the registries' labels are the paper's


def test_paper_addition_is_appendix_a1s_rows_and_ours():
    batch = jobs("experiment=paper_addition")
    assert len(batch) == 6 * 3
    labels = set()
    for overrides in batch[::3]:  # seed 0 of each row
        cfg = load_config("stnbench_train", overrides)
        assert cfg.data.name == "addition" and cfg.train.steps == 150_000
        st = is_st(cfg.model.name)
        labels.add(report.row_label(cfg.model.name, cfg.transform.kind if st else None,
                                    transformers=cfg.model.transformers))  # fmt: skip
    assert {"FCN", "CNN", "ST-FCN Aff", "2xST-FCN Aff"} <= labels  # the paper's A.1 rows
    assert {"ST-CNN Aff", "2xST-CNN Aff"} <= labels


def test_a_second_spelling_of_a_run_says_so_and_the_report_counts_it_once(mnist_root, bin_dir,
                                                                          tmp_path):  # fmt: skip
    first = cli(bin_dir, tmp_path, "stnbench-train", "model=cnn", *TINY)
    assert first.returncode == 0, first.stderr
    again = cli(bin_dir, tmp_path, "stnbench-train", "row=cnn", "optim=sgd", *TINY)
    assert again.returncode == 0, again.stderr
    assert "is the same configuration as" in again.stdout + again.stderr
    assert "finished: not training it again" in again.stdout + again.stderr
    assert len(list((tmp_path / "outputs").rglob("metrics.json"))) == 1
    rep = cli(bin_dir, tmp_path, "stnbench-report", "outputs/runs")
    assert rep.returncode == 0, rep.stderr
    assert "1 runs (1 ok); 1 duplicates set aside" in rep.stdout
    assert "set aside, counted once" in rep.stderr


def test_paper_fcn_is_every_fully_connected_cell_once_on_fresh_draws():
    """Table 1's 16 fully connected cells, TC's 2 and addition's 3, x seeds 0-2: one command
    (three grids of hydra.sweeper.grids), at the paper's protocol on fresh draws."""
    batch = jobs("experiment=paper_fcn")
    cells = {tuple(o for o in job if o.startswith(("data=", "row="))) for job in batch}
    assert len(batch) == 3 * len(cells) and len(cells) == 16 + 2 + 3
    rows = {"fcn", "st_fcn_aff", "st_fcn_proj", "st_fcn_tps"}
    expected = {(f"data={d}", f"row={r}") for d in ("r", "rts", "p", "e") for r in rows}
    expected |= {("data=tc", "row=fcn"), ("data=tc", "row=st_fcn_aff")}
    expected |= {("data=addition", f"row={r}") for r in ("fcn", "st_fcn_aff", "st_fcn_aff_x2")}
    assert cells == expected
    cfg = load_config("stnbench_train", ["experiment=paper_fcn", "data=addition",
                                         "row=st_fcn_aff_x2", "seed=0"])  # fmt: skip
    assert cfg.data.fresh is True and cfg.model.transformers == 2
    assert (cfg.train.steps, cfg.train.batch_size, cfg.optim.lr) == (150_000, 256, 0.01)
    assert (cfg.schedule.name, cfg.schedule.every, cfg.optim.momentum) == ("step", 50_000, 0.9)
    # the command line narrows every grid, and leaves out those that do not hold its value
    assert len(jobs("experiment=paper_fcn", "data=addition", "seed=0")) == 3
    (one,) = jobs("experiment=paper_fcn", "row=st_fcn_aff_x2", "seed=1")
    assert {"data=addition", "row=st_fcn_aff_x2", "seed=1"} <= set(one)
    assert len(jobs("experiment=paper_fcn", "data=r,tc", "seed=0")) == 4 + 2
    assert len(jobs("experiment=paper_fcn", "data.fresh=false", "seed=2")) == 21


def test_experiment_sweeps_need_m_and_take_command_line_values(bin_dir, tmp_path):
    r = cli(bin_dir, tmp_path, "stnbench-train", "experiment=paper_table1")
    hint = "sweeps data, row, seed (hydra.sweeper.params); add -m to run the sweep, or pin each, "
    hint += "e.g. data=r"
    assert r.returncode == 2 and hint in r.stderr
    assert not (tmp_path / "outputs").exists()
    # each sweep pinned on the command line: one run
    one = ["data=plain", "row=fcn", "seed=0", "train.steps=2", "train.val_size=100"]
    r = cli(bin_dir, tmp_path, "stnbench-train", "experiment=paper_table1", *one)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "outputs").rglob("metrics.json"))) == 1
    assert len(jobs("experiment=paper_table1", "data=rts")) == 24
    assert len(jobs("experiment=paper_tc")) == 4 * 3
    r = cli(bin_dir, tmp_path, "stnbench-train", "experiment=paper_fcn", "seed=0")
    assert r.returncode == 2 and "sweeps data, row (hydra.sweeper.params)" in r.stderr
    sweep = jobs("experiment=lr_sweep")
    assert len(sweep) == 3 * 4
    cfg = load_config("stnbench_train", sweep[-1])
    assert cfg.data.name == "seed40" and cfg.optim.name == "adam" and cfg.model.residual
    assert cfg.optim.lr == 1e-3
