"""Hyper-parameter search with Hydra's Optuna sweeper (conf/hparams_search/): the search space
that depends on the model, and what a trial returns to the study."""

from omegaconf import DictConfig

from stnbench import models, tasks
from stnbench.config import pin_hint, unpinned_sweeps
from stnbench.errors import StnbenchError

LOC_LR_MULT = (0.03, 1.0)  # the localisation net's lr multiplier, searched on a log scale


def st_params(cfg, trial) -> None:
    """hparams_search's custom search space: for ST models, the localisation net's lr
    multiplier too (the learning rate of the localisation net is what limits ST training)."""
    if models.is_st(cfg.model.name):
        trial.suggest_float("optim.loc_lr_mult", *LOC_LR_MULT, log=True)


def check_space(config: DictConfig) -> None:
    """Refuse a search that would also search what the command line did not ask for: a sweep an
    experiment brings (fast_table1's ``seed: 0,1,2``) would let the study pick the luckiest seed."""
    for key, value in unpinned_sweeps(config).items():
        if not key.startswith("optim."):
            raise StnbenchError(
                f"hydra.sweeper.params.{key}: a search tunes optim.* only; got the sweep "
                f"'{value}' from the config (an experiment's); {pin_hint({key: value})}"
            )


def objective(cfg, metrics: dict | None) -> float:
    """A trial's result: its metrics' ``optimized_metric``; its task's chance for a run that
    diverged, collapsed, failed or was refused, so the study goes on and learns to avoid it."""
    value = (metrics or {}).get(cfg.optimized_metric)
    chance = tasks.get(cfg.task.name).METRIC.chance
    return chance if value is None or metrics["status"] != "ok" else float(value)
