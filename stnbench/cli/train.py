"""stnbench-train: a Hydra app that trains one configuration, or sweeps many with -m.

Before Hydra starts, every job of the command is composed and validated, so bad input (an
unknown group option, a bad value, a data root that is a file) is one line on stderr, exit
status 2, and no run folder. Inside a sweep, a job whose input is still refused is logged and
skipped, and the sweep goes on.
"""

import itertools
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
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
MAX_CHECKED = 256  # jobs of a sweep composed ahead; a larger sweep checks the first ones

log = logging.getLogger(PROG)


def jobs(argv: list[str]) -> list[list[str]]:
    """The override lists of every job the command line makes (sweeps expanded)."""
    overrides = [a for a in argv if not a.startswith("-")]
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.islice(itertools.product(*choices), MAX_CHECKED)]


def precheck(argv: list[str]) -> None:
    from stnbench.train import validate

    for overrides in jobs(argv):
        validate(load_config(CONFIG, overrides))


@hydra.main(config_path="pkg://stnbench.conf", config_name=CONFIG, version_base="1.3")
def app(cfg: DictConfig) -> dict | None:
    from stnbench.train import train

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
        return None
    if not sweep:
        where = os.path.relpath(out)
        print(f"{PROG}: {metrics['status']}, test error {metrics['test_error']}% -> {where}")
        print(f"TensorBoard: tensorboard --logdir {where}")
    return metrics


class TensorBoardHint(Callback):
    """After a sweep, say where to point TensorBoard (each job prints only to its log)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(f"TensorBoard: tensorboard --logdir {config.hydra.sweep.dir}")


def main() -> int:
    argv = sys.argv[1:]
    if not PASS_THROUGH.intersection(argv):
        code = run(PROG, lambda: precheck(argv))
        if code:
            return code
    app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
