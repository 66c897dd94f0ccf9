"""stnbench-train: a Hydra app that trains one configuration, or sweeps many with -m.

Before Hydra starts, every job of the command (the command line's sweeps and an experiment's
``hydra.sweeper.params``) is composed and validated, so bad input (an unknown group option, a bad
value, a data root that is a file) is one line on stderr, exit status 2, and no run folder.
Inside a sweep nothing stops the sweep: a job whose input is still refused is logged and skipped,
and a job that raises is recorded as ``status: failed`` in its metrics.json (rerunning the
command retries it), so the other jobs go on.
"""

import collections
import itertools
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra_plugins.stnbench_launcher.vectorized_launcher import VectorizedLauncher
from omegaconf import DictConfig

from stnbench.cli import load_config, run
from stnbench.errors import StnbenchError, one_line

PROG = "stnbench-train"
CONFIG = "stnbench_train"
PASS_THROUGH = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-c",
    "--cfg",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "-p",
    "--package",
    "-cd",
    "--config-dir",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
}
MULTIRUN = {"-m", "--multirun"}
MAX_CHECKED = 256  # jobs of a sweep composed ahead; a larger sweep checks the first ones

log = logging.getLogger(PROG)
OUTCOMES = collections.Counter()  # statuses of this process's jobs (the sequential launcher's)


def sweeper_params(overrides: list[str]) -> list[str]:
    """The sweep an experiment config declares (``hydra.sweeper.params``) as overrides."""
    params = load_config(CONFIG, overrides, with_hydra=True).hydra.sweeper.get("params") or {}
    return [f"{k}={v}" for k, v in params.items()]


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of every job the command makes, as Hydra's basic sweeper expands it:
    the config's sweeper params first, a command-line value for the same key replacing them."""
    parser = OverridesParser.create()
    overrides = [a for a in argv if not a.startswith("-")]
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    params = sweeper_params(fixed)
    if params and not MULTIRUN.intersection(argv):
        keys = ", ".join(p.split("=")[0] for p in params)
        raise StnbenchError(
            f"this config is a sweep over {keys} (hydra.sweeper.params); add -m to run it"
        )
    choices = {}
    for o in parser.parse_overrides(params + overrides):
        key = o.get_key_element()
        if o.is_sweep_override():
            choices[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            choices[key] = [o.input_line]
    product = itertools.product(*choices.values())
    return [list(c) for c in itertools.islice(product, MAX_CHECKED)]


def precheck(argv: list[str]) -> None:
    from stnbench.train import validate

    for overrides in jobs(argv):
        validate(load_config(CONFIG, overrides))


@hydra.main(config_path="pkg://stnbench.conf", config_name=CONFIG, version_base="1.3")
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
            print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
            sys.exit(2)
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


class TensorBoardHint(Callback):
    """After a sweep: how its jobs ended (when they ran in this process), where to point
    TensorBoard and how to make the table (each job prints only to its log)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if OUTCOMES:
            counts = ", ".join(f"{n} {status}" for status, n in sorted(OUTCOMES.items()))
            print(f"{PROG}: {sum(OUTCOMES.values())} jobs: {counts}")
        print(f"TensorBoard: tensorboard --logdir {config.hydra.sweep.dir}")
        print(f"Table: stnbench-report {config.hydra.sweep.dir}")


def main() -> int:
    # hydra/launcher=vectorized: Hydra's plugin scan misses it in an editable install
    Plugins.instance().register(VectorizedLauncher)
    argv = sys.argv[1:]
    if not PASS_THROUGH.intersection(argv):
        code = run(PROG, lambda: precheck(argv))
        if code:
            return code
    app()
    return 1 if OUTCOMES["failed"] or OUTCOMES["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
