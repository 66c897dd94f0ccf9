"""Tasks: what a run learns and how it is scored, as plain functions the training loop calls.

A task is a module here with:

- ``METRIC``: its headline metric (a ``Metric``): the name metrics.json's results carry, whether
  lower is better, and what a guess scores (chance), which a search's failed trials score (the
  collapse rule still reads train.collapse.error);
- ``loss(model, x, y, label_smoothing)``: the training loss on a batch (left on the device) and
  the count the training log turns into the metric;
- ``evaluate(fn, x, y, batch)``: the mean loss and the metric on a split, in batches.

``classify`` (the paper's Table 1 and Appendix A.1) is the only task yet; the loop, the report
and the search still name its metric, ``error``, where they have not been moved to ``METRIC``.
"""

import importlib
from dataclasses import dataclass
from types import ModuleType

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


def get(name: str) -> ModuleType:
    """The task module of that name (one of TASKS)."""
    if name not in TASKS:
        raise StnbenchError(f"task={name}: no such task (expected one of {', '.join(TASKS)})")
    return importlib.import_module(f"stnbench.tasks.{name}")
