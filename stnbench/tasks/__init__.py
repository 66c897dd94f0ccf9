"""Tasks: what a run learns and how it is scored, as plain functions the training loop calls.

A task is a module here with ``METRIC`` (a ``Metric``: the name metrics.json's results carry,
whether lower is better, what a guess scores), ``splits``, ``batches``, ``build_model``, ``loss``,
``evaluate``, ``settings``, ``check`` and optionally ``table`` (docs/extending.md, "A task", says
what each takes and returns). ``classify`` (Table 1, Appendix A.1) is the default; ``coloc`` is the
paper's co-localisation (Appendix A.2).
"""

import importlib
from dataclasses import dataclass
from types import ModuleType

from omegaconf import DictConfig, OmegaConf

from stnbench.errors import StnbenchError

TASKS = ("classify", "coloc")


@dataclass(frozen=True)
class Metric:
    """A task's headline metric."""

    name: str  # metrics.json's test_<name>, val_<name>, best_test_<name>
    unit: str
    lower_is_better: bool
    chance: float  # what a guess scores

    def better(self, value: float, than: float | None) -> bool:
        """Whether ``value`` is better than ``than`` (None: nothing yet)."""
        return than is None or (value < than if self.lower_is_better else value > than)


def name_of(cfg) -> str:
    """A config's or a metrics.json's task: classification for those from before tasks existed
    (no ``task``, or a NaN in a runs.csv's column)."""
    task = OmegaConf.select(cfg, "task.name") if isinstance(cfg, DictConfig) else cfg.get("task")
    if isinstance(task, dict):  # a plain config dict
        task = task.get("name")
    return task if isinstance(task, str) else "classify"


def get(name: str) -> ModuleType:
    """The task module of that name (one of TASKS)."""
    if name not in TASKS:
        raise StnbenchError(f"task={name}: no such task (expected one of {', '.join(TASKS)})")
    return importlib.import_module(f"stnbench.tasks.{name}")
