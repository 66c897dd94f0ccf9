"""stnbench-train: a Hydra app that trains one configuration, or sweeps many with -m.

Bad input (an unknown key, a wrong type, a value out of range) is refused before a run's folder
exists, or for every job before a sweep starts: one line on stderr, exit status 2. In a sweep a
refused or crashed job is logged and the sweep goes on; what each failure does and its exit
status: docs/training.md, "Failures are results".
"""

import collections
import json
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stnbench import tasks
from stnbench.cli import run
from stnbench.config import check, pin_hint, unpinned_sweeps
from stnbench.errors import StnbenchError, one_line
from stnbench.search import check_space, objective

PROG = "stnbench-train"
log = logging.getLogger(PROG)
# unsmoothed error curves first (docs/training.md, "TensorBoard"); 6006 is its default port
TENSORBOARD_URL = "http://localhost:6006/?smoothing=0#timeseries"
OUTCOMES = collections.Counter()  # statuses of a sweep's jobs, or of the one run


@hydra.main(config_path="pkg://stnbench.conf", config_name="stnbench_train", version_base="1.3")
def app(cfg: DictConfig) -> dict | float | str | None:
    """One job: its metrics, or in a search (hparams_search) the number the study minimises;
    in a stopped sweep what became of it (local_launcher.STOPPED or NOT_STARTED)."""
    from hydra_plugins.stnbench_launcher.local_launcher import NOT_STARTED, STOPPED

    metrics = job(cfg)
    if metrics in (STOPPED, NOT_STARTED):  # the launcher counts these; the study never sees them
        return metrics
    return objective(cfg, metrics) if cfg.optimized_metric else metrics


def job(cfg: DictConfig) -> dict | str | None:
    from hydra_plugins.stnbench_launcher import local_launcher as launcher

    from stnbench.rundir import record_failure
    from stnbench.train import train

    if launcher.stop_requested():  # a worker of a sweep that was stopped: not started
        return launcher.NOT_STARTED
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    progress = cfg.train.progress
    progress = (sys.stderr.isatty() and not sweep) if progress == "auto" else progress
    out = Path(hc.runtime.output_dir)
    try:
        metrics = train(cfg, out, progress, launcher.stop_requested)
    except KeyboardInterrupt:  # it saved its checkpoint; a worker's launcher ends the sweep
        if launcher.STOP is not None:
            return launcher.STOPPED
        raise
    except StnbenchError as e:  # refused: bad input, a folder in use or of another run
        return ended(e.code, f"{out}: skipped: {one_line(e)}", sweep, str(e))
    except Exception as e:  # a crash is recorded, its traceback goes to the run's train.log
        metrics = record_failure(cfg, out, e)
        to_log_file(e)
        failed = f"{out}: failed: {type(e).__name__}: {one_line(e)[:300]}"
        failed += "; the traceback is in its train.log"
        retry = "rerun the same command to retry (it resumes)"
        if out_of_memory(e):  # a rerun fails the same way
            t = cfg.train
            retry = f"out of memory: lower train.batch_size ({t.batch_size}) or "
            retry += f"train.eval_batch_size ({t.eval_batch_size}) and rerun"
        ended(
            1, f"{failed}; recorded in metrics.json, retried when the sweep is rerun", sweep,
            f"{failed}; {retry}", metrics["status"],
        )  # fmt: skip
        return metrics
    OUTCOMES[metrics["status"]] += 1
    if not sweep:
        where = os.path.relpath(out)
        m = tasks.get(cfg.task.name).METRIC
        test = metrics[f"test_{m.name}"]
        print(f"{PROG}: {metrics['status']}, test {m.name} {test}{m.unit} -> {where}")
        print(f"TensorBoard: tensorboard --logdir {where}, then open {TENSORBOARD_URL}")
    return metrics


def out_of_memory(error: BaseException) -> bool:
    """Whether a crash is an allocation that failed (torch's CPU and CUDA allocators, Python)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate" in text


def count_returns(returns: list[JobReturn]) -> None:
    """Counts into OUTCOMES how jobs that ran in other processes (joblib's, submitit's) ended,
    from what they returned: a job returns its metrics, nothing when it was refused, and in a
    search the number the study minimises (then its metrics.json says how it ended). (The jobs
    of a stopped sweep, which return local_launcher.STOPPED or NOT_STARTED, its launcher counts.)"""
    for r in returns:
        value = r.return_value if r.status == JobStatus.COMPLETED else None
        if isinstance(value, float):
            found = Path(r.hydra_cfg.hydra.runtime.output_dir) / "metrics.json"
            value = json.loads(found.read_text()) if found.exists() else None
        OUTCOMES[value["status"] if isinstance(value, dict) else "skipped"] += 1


def ended(code: int, in_sweep: str, sweep: bool, alone: str, status="skipped") -> None:
    """A job that could not finish: a sweep logs it and goes on; a single run prints one line
    (raising would add Hydra's own line) and main() exits with ``code``."""
    OUTCOMES[status] += 1
    if sweep:
        log.error("%s", in_sweep)
    else:
        print(f"{PROG}: error: {one_line(alone)}", file=sys.stderr)
        OUTCOMES.setdefault("exit", code)


def to_log_file(error: BaseException) -> None:
    """An exception's traceback into the job's log file only (Hydra's FileHandler: train.log)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback:", (),
                            (type(error), error, error.__traceback__))  # fmt: skip
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class Checks(Callback):
    """A single run's settings checked before its folder is made; after a sweep, how its jobs
    ended, where to point TensorBoard and how to make the table
    (each job prints only to its log). ``prog`` names the command in its messages."""

    def __init__(self, prog: str = PROG):
        self.prog = prog

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        def checks():
            if sweeps := unpinned_sweeps(config):  # pinned on the command line, it is one run
                raise StnbenchError(
                    f"this config sweeps {', '.join(sweeps)} (hydra.sweeper.params); add -m to "
                    f"run the sweep, or {pin_hint(sweeps)}"
                )
            check(config)

        if code := run(self.prog, checks):  # Hydra turns a callback's exception into a warning
            sys.exit(code)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if config.get("optimized_metric"):  # a search: what its trials share, before the first
            if code := run(self.prog, lambda: (check_space(config), check(config))):
                sys.exit(code)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if OUTCOMES:
            counts = ", ".join(f"{n} {status}" for status, n in sorted(OUTCOMES.items()))
            print(f"{self.prog}: {sum(OUTCOMES.values())} jobs: {counts}")
        where = config.hydra.sweep.dir
        print(f"TensorBoard: tensorboard --logdir {where}, then open {TENSORBOARD_URL}")
        print(f"Table: stnbench-report {config.hydra.sweep.dir}")
        found = Path(config.hydra.sweep.dir) / "optimization_results.yaml"  # Optuna's sweeper's
        if config.get("optimized_metric") and found.exists():
            best = OmegaConf.load(found)
            params = " ".join(f"{k}={v:.3g}" for k, v in best.best_params.items())
            print(f"Best: {params} ({config.optimized_metric} {best.best_value:g}%) -> {found}")


def main() -> int:
    # Hydra's plugin scan misses our sweeper and launcher in an editable install. It re-executes
    # Hydra's own plugin modules, so ours, subclasses of those, are imported after it.
    plugins = Plugins.instance()
    from hydra_plugins.stnbench_launcher.checked_sweeper import CheckedSweeper
    from hydra_plugins.stnbench_launcher.local_launcher import LocalLauncher

    plugins.register(CheckedSweeper)
    plugins.register(LocalLauncher)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach run(): one line each
    logging.raiseExceptions = False  # a log file on a full disk: no second traceback
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C
    code = run(PROG, app)
    if code:
        return code
    return OUTCOMES.pop("exit", 0) or (1 if OUTCOMES["failed"] or OUTCOMES["skipped"] else 0)


if __name__ == "__main__":
    sys.exit(main())
