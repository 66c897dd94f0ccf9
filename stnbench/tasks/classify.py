"""Classification: cross-entropy on the logits, scored by the error (%) of their argmax."""

import torch
import torch.nn.functional as F
from torch import Tensor

from stnbench.tasks import Metric

METRIC = Metric(name="error", unit="%", lower_is_better=True, chance=90.0)  # 1 in 10 classes


def loss(model, x: Tensor, y: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """The training loss on a batch, and how many of its predictions are wrong (on the device)."""
    logits = model(x)
    wrong = (logits.detach().argmax(1) != y).sum()
    return F.cross_entropy(logits, y, label_smoothing=label_smoothing), wrong


@torch.no_grad()
def evaluate(fn, x: Tensor, y: Tensor, batch: int) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) of logits fn(x) against y, in batches."""
    total = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch):
        logits = fn(x[i : i + batch])
        total += F.cross_entropy(logits, y[i : i + batch], reduction="sum")
        wrong += (logits.argmax(1) != y[i : i + batch]).sum()
    return total.item() / len(x), 100.0 * wrong.item() / len(x)
