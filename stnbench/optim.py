"""Optimisers and learning-rate schedules by name: one registration each.

``SCHEDULES[name](schedule, step, total)`` is the multiplier of the base learning rate at
``step`` (0-based) of ``total``; ``make_optimizer`` builds the named optimiser with every
localisation net in a parameter group of its own (``loc_lr_mult`` times the learning rate);
``make_ema`` the moving average of the weights that validation reads (train.ema).
"""

import math

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from stnbench.transformer import SpatialTransformer

SCHEDULES = {
    "constant": lambda s, step, total: 1.0,
    # one-cycle: up over the warm-up (lr_factor), then linearly down to floor at the end
    "onecycle": lambda s, step, total: (
        1 - (1 - s.floor) * max(0, step - _warm(s, total)) / max(1, total - _warm(s, total))
    ),
    "step": lambda s, step, total: s.gamma ** (step // s.every),
    "exponential": lambda s, step, total: s.gamma ** (step / s.every),
    "cosine": lambda s, step, total: (
        s.floor + (1 - s.floor) * (1 + math.cos(math.pi * step / total)) / 2
    ),
}

OPTIMIZERS = {
    "sgd": lambda groups, o: torch.optim.SGD(
        groups, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov
    ),
    "adam": lambda groups, o: torch.optim.Adam(
        groups, betas=(o.momentum, 0.999), weight_decay=o.weight_decay
    ),  # momentum is Adam's beta1
}


def _warm(schedule, total: int) -> int:
    return round(schedule.warmup * total)  # warm-up steps


def lr_factor(schedule, step: int, total: int) -> float:
    """The schedule's multiplier of the base learning rate at ``step`` (0-based): a linear
    warm-up from 1/w to 1 over the first w = warmup x total steps, times the schedule's own."""
    warm = min(1.0, (step + 1) / _warm(schedule, total)) if _warm(schedule, total) else 1.0
    return warm * SCHEDULES[schedule.name](schedule, step, total)


def make_optimizer(model: nn.Module, optim) -> torch.optim.Optimizer:
    """The configured optimiser; every spatial transformer's localisation net (side by side, on
    the feature maps) gets ``loc_lr_mult`` times the lr."""
    nets = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    loc = {id(p) for net in nets for p in net.parameters()}
    groups = [{"params": [p for p in model.parameters() if id(p) not in loc], "base_lr": optim.lr}]
    if loc:
        loc_params = [p for p in model.parameters() if id(p) in loc]
        groups.append({"params": loc_params, "base_lr": optim.lr * optim.loc_lr_mult})
    for g in groups:
        g["lr"] = g["base_lr"]
    return OPTIMIZERS[optim.name](groups, optim)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = group["base_lr"] * factor


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the model's weights (None when decay is 0); its decay
    warms up, min(decay, (1 + t) / (10 + t)) at its t-th update, so early averages are not stale."""
    if not decay:
        return None

    def update(ema: list[Tensor], current: list[Tensor], t: Tensor) -> None:
        torch._foreach_lerp_(ema, current, 1 - min(decay, (1 + int(t)) / (10 + int(t))))

    return AveragedModel(model, multi_avg_fn=update)
