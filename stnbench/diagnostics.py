"""What a run's spatial transformers do, at each validation (stnbench.train.validate): each
parameter's histogram and spread, the distance from the identity, the localisation net's dead
units, its outputs' ink, and 8 inputs above their outputs, to TensorBoard; and whether a
finished run's transformer is dead (``dead``)."""

import torch
from torch import Tensor

from stnbench import geometry, tblog
from stnbench.transformer import BLANK_INK, DEAD_SPREAD, ink, liveness


def diagnose(
    t, x: Tensor, batch: int, writer, step: int, tag: str = "", panel: bool = True
) -> tuple[float, ...]:
    """One transformer's diagnostics on x to TensorBoard, under ``tag`` (``t2/``: the second of
    several side by side; ``multi/``: the one on the feature maps, which draws no ``panel``).
    Returns the mean distance from the identity, the largest spread, the share of dead units
    and the ink."""
    params, fired = liveness(t, x, batch)  # (N, P), (U,)
    distance = (params - t.identity).norm(dim=1).mean().item()
    spread = params.std(0)  # (P,): how much each parameter follows the input
    for i, name in enumerate(geometry.param_names(t.kind)):
        writer.add_histogram(f"theta/{tag}{name}", params[:, i], step)
        writer.add_scalar(f"transform_spread/{tag}{name}", spread[i], step)
    writer.add_scalar(f"transform/{tag}identity_distance", distance, step)
    share = ink(t, x[:batch])
    writer.add_scalar(f"transform/{tag}ink", share, step)
    if panel:
        with torch.no_grad():
            shown, p = t(x[:8])
        image = tblog.transform_panel(x[:8], shown, t.kind, p)
        writer.add_image(f"transform/{tag}{tblog.PANEL}", image, step)
    return distance, spread.max().item(), 1 - fired.float().mean().item(), share


def transformers(
    model, x: Tensor, batch: int, writer, step: int
) -> tuple[float, float, float, str]:
    """Every transformer's diagnostics: the input's (``t1/``, ``t2/`` ... where there are
    several) on x, the feature maps' (``multi/``, model.multi) on the first ``batch`` inputs'
    feature maps; the run's spread, dead units and ink, each its least alive transformer's, and
    their log line."""
    several = len(model.transformers) > 1  # one transformer: its tags as they always were
    distance, spread, dead_units, shares = zip(*(
        [diagnose(t, x, batch, writer, step, f"t{i + 1}/" * several)
         for i, t in enumerate(model.transformers)]
        + [diagnose(t, f, batch, writer, step, "multi/", panel=False)
           for t, f in feature_inputs(model, x[:batch])]
    ), strict=True)  # fmt: skip
    spread, dead_units, share = min(spread), max(dead_units), min(shares)
    writer.add_scalar("transform/spread", spread, step)
    writer.add_scalar("transform/dead_units", dead_units, step)
    line = f"distance from identity {', '.join(f'{v:.3f}' for v in distance)}, spread "
    line += f"{spread:.2g}, dead units {dead_units:.0%}, ink {share:.2f}"
    return spread, dead_units, share, line


def feature_inputs(model, x: Tensor) -> list[tuple]:
    """A model's transformers on its feature maps (model.multi), each with the feature maps
    that reach it for inputs x (stnbench.models.STModel.feature_inputs); none for another."""
    return model.feature_inputs(x) if hasattr(model, "feature_inputs") else []


def dead(spread: float | None, share: float | None) -> bool | None:
    """Whether a run's transformer is dead at its last validation: it stopped following its
    input (spread below DEAD_SPREAD), or it samples blank space (its outputs keep less than
    BLANK_INK of the input's ink: flown off the canvas, whatever its spread). None without one."""
    if spread is None:
        return None
    return spread < DEAD_SPREAD or (share is not None and share < BLANK_INK)
