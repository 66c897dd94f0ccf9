"""What reads runs that older versions of stnbench wrote, in one place: each entry says what
changed and when, so that it can go once no such run is left.

- ``before_loc_lr_fix``: runs with several transformers trained before commit 666d9d5.
- ``fresh_of``: runs whose metrics.json predates its ``fresh`` field (the data regime).
- ``VAL_ERROR``, ``PANEL``: TensorBoard tags before 2026-12-07 (stnbench.tblog has today's).
- ``curves_lr``: a curves.csv written before its lines were kept apart by learning rate.
"""

from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

VAL_ERROR = "val/error"  # the validation error's tag before 2026-12-07 (now error/val)
PANEL = "inputs_and_outputs"  # the transformer image's, each input beside its output


def before_loc_lr_fix(m) -> bool:
    """Whether a run's metrics (a dict, or a row of stnbench.report's) are those of a model with
    several transformers trained before commit 666d9d5, when only the first one's localisation
    net got optim.loc_lr_mult's share of the lr and the others the full lr."""

    m = {k: v for k, v in dict(m).items() if v is not None and v == v}  # NaN: not recorded
    several = m.get("transformers", 1) > 1 or m.get("multi") in (True, 1)
    return several and m.get("loc_lr_mult", 1) != 1 and not m.get("loc_lr_every_transformer")


def state_fields(saved: dict) -> dict:
    """A checkpoint's training state under today's names: before the task layer its best
    validation metric was ``best_val_error``."""
    if "best_val_error" in saved:
        saved = dict(saved)
        saved["best_val"] = saved.pop("best_val_error")
    return saved


def fresh_of(folder: Path) -> bool:
    """Whether a run trained on fresh draws, from its Hydra config (False where it has none):
    for a metrics.json written before it recorded ``fresh``."""
    try:
        return OmegaConf.load(folder / ".hydra" / "config.yaml").data.get("fresh") is True
    except Exception:  # no config, or not a training run's
        return False


def curves_lr(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """A curves.csv written before stnbench-report kept a row's learning rates apart (it has no
    lr column), with the lr of its runs (stnbench.report rows) where every run of a (protocol,
    data, row) had the same one; a line whose runs had several is left out (its lrs pooled)."""
    lrs = runs.groupby(["protocol", "data", "row"]).lr.agg(["nunique", "first"])
    one = lrs[lrs["nunique"] == 1]["first"].rename("lr")
    return frame.join(one, on=["protocol", "data", "row"], how="inner")
