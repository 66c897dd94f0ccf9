"""stnbench-train: a Hydra app that trains one configuration, or sweeps many with -m.

Hydra composes the config against stnbench.config's schemas, so an unknown key or a value of the
wrong type is refused before anything is written; ranges are checked next, before the run's
folder exists (``Checks.on_run_start``), or for every job before a sweep starts
(hydra/sweeper=stnbench). Each is one line on stderr and exit status 2. Inside a sweep nothing
stops the sweep: a job whose input is refused is logged and skipped, and a job that raises is
recorded as ``status: failed`` in its metrics.json (rerunning the command retries it).
"""

import collections
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra_plugins.stnbench_launcher.vectorized_launcher import VectorizedLauncher
from omegaconf import DictConfig

from stnbench.cli import run
from stnbench.config import check
from stnbench.errors import StnbenchError, one_line

PROG = "stnbench-train"
log = logging.getLogger(PROG)
OUTCOMES = collections.Counter()  # statuses of this process's jobs (the sequential launcher's)


@hydra.main(config_path="pkg://stnbench.conf", config_name="stnbench_train", version_base="1.3")
def app(cfg: DictConfig) -> dict | None:
    from stnbench.train import record_failure, train

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    progress = cfg.train.progress
    progress = (sys.stderr.isatty() and not sweep) if progress == "auto" else progress
    out = Path(hc.runtime.output_dir)
    try:
        metrics = train(cfg, out, progress)
    except StnbenchError as e:
        if not sweep:
            raise
        log.error("%s: skipped: %s", out, one_line(e))  # a sweep goes on
        OUTCOMES["skipped"] += 1
        return None
    except Exception as e:  # a crash is recorded; a sweep goes on, a single run re-raises
        metrics = record_failure(cfg, out, e)
        if not sweep:
            raise
        log.exception("%s: failed; recorded in metrics.json, retried when rerun", out)
    OUTCOMES[metrics["status"]] += 1
    if not sweep:
        where = os.path.relpath(out)
        print(f"{PROG}: {metrics['status']}, test error {metrics['test_error']}% -> {where}")
        print(f"TensorBoard: tensorboard --logdir {where}")
    return metrics


class Checks(Callback):
    """A single run's settings checked before its folder is made; after a sweep, how its jobs
    ended (when they ran in this process), where to point TensorBoard and how to make the table
    (each job prints only to its log)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        def checks():
            if params := config.hydra.sweeper.get("params"):
                raise StnbenchError(
                    f"this config is a sweep over {', '.join(params)} (hydra.sweeper.params); add "
                    "-m to run it"
                )
            check(config)

        if code := run(PROG, checks):  # Hydra turns a callback's exception into a warning
            sys.exit(code)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if OUTCOMES:
            counts = ", ".join(f"{n} {status}" for status, n in sorted(OUTCOMES.items()))
            print(f"{PROG}: {sum(OUTCOMES.values())} jobs: {counts}")
        print(f"TensorBoard: tensorboard --logdir {config.hydra.sweep.dir}")
        print(f"Table: stnbench-report {config.hydra.sweep.dir}")


def main() -> int:
    # Hydra's plugin scan misses our sweeper and launcher in an editable install. It re-executes
    # Hydra's own plugin modules, so the sweeper, a subclass of one, is imported after it.
    plugins = Plugins.instance()
    from hydra_plugins.stnbench_launcher.checked_sweeper import CheckedSweeper

    plugins.register(CheckedSweeper)
    plugins.register(VectorizedLauncher)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach run(): one line each
    code = run(PROG, app)
    if code:
        return code
    return 1 if OUTCOMES["failed"] or OUTCOMES["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
