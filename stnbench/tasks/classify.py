"""Classification (the paper's Table 1 and Appendix A.1): a classifier of the dataset's images,
cross-entropy on its logits, scored by the error (%) of their argmax."""

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stnbench import data, models
from stnbench.config import recipe_of
from stnbench.errors import StnbenchError
from stnbench.tasks import Metric

METRIC = Metric(name="error", unit="%", lower_is_better=True, chance=90.0)  # 1 in 10 classes

# A run's data on the device: split -> (images (N, C, S, S), labels (N,)), for train (redrawn
# each epoch when data.fresh), val and test
Splits = dict[str, tuple[Tensor, Tensor]]


def check(cfg) -> None:
    """What the task needs of a config (stnbench.config.TrainJob calls this as it is composed):
    no class of its own, for it trains on every class."""
    if cfg.data.digit is not None:
        raise StnbenchError(f"data.digit={cfg.data.digit}: task=classify trains on every class; "
                            "only task=coloc reads data.digit (leave it null)")  # fmt: skip


def settings(cfg: DictConfig) -> dict:
    """What metrics.json records of the task beyond the common settings: nothing (runs from
    before tasks existed read the same)."""
    return {}


def splits(cfg: DictConfig, dev: torch.device) -> Splits:
    """The run's val and test splits, and its fixed training set unless data.fresh (batches
    draws those)."""
    rec, c = recipe_of(cfg), cfg.data

    def split(name: str, limit: int | None):
        x, y = data.load(c.name, name, c.root, c.seed, dev, rec)
        return x[:limit].to(dev), y[:limit].to(dev)

    sizes = {"val": cfg.train.val_size, "test": None}
    if not c.fresh:
        sizes["train"] = c.train_size or data.TRAIN_SIZE
    return {name: split(name, limit) for name, limit in sizes.items()}


def batches(cfg: DictConfig, d: Splits, start: int):
    """The batches (x (B, C, S, S), y (B,)) of steps start, start + 1, ...: step s's batch is a
    pure function of (seed, epoch, position), and of the epoch's fresh draw when data.fresh,
    whose images are rendered a batch at a time (stnbench.distortions.Draw)."""
    b, c, dev = cfg.train.batch_size, cfg.data, d["val"][0].device
    n = min(c.train_size or data.TRAIN_SIZE, data.TRAIN_SIZE)
    per_epoch, step = n // b, start
    while True:
        epoch = step // per_epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + epoch)).to(dev)  # fmt: skip
        if c.fresh:  # a fresh draw's labels too: addition draws new partners each epoch
            fresh = data.draw(c.name, "train", c.root, c.seed, recipe_of(cfg), epoch)
        for j in range(step % per_epoch, per_epoch):
            idx = order[j * b : (j + 1) * b]
            if c.fresh:  # the draw's values live on the CPU
                on_cpu = idx.cpu()
                yield fresh.images(on_cpu, dev), fresh.labels[on_cpu].to(dev)
            else:
                yield d["train"][0][idx], d["train"][1][idx]
        step = (epoch + 1) * per_epoch


def build_model(cfg: DictConfig, dev: torch.device, pretrained: bool = True) -> nn.Module:
    """The run's classifier for its data's shape, initialised from its seed, as the loop runs
    it (models.prepare); ``pretrained`` (no part of it is) is coloc's."""
    torch.manual_seed(cfg.seed)
    c = OmegaConf.to_container
    channels, canvas, classes = data.shape(recipe_of(cfg))
    net = models.from_config(c(cfg.model), c(cfg.transform), canvas, classes, channels)
    return models.prepare(net, dev)


def loss(model, x: Tensor, y: Tensor, cfg: DictConfig | None = None) -> tuple[Tensor, Tensor]:
    """The training loss on a batch (with cfg's train.label_smoothing; none without a cfg), and
    how many of its predictions are wrong (on the device): the training log's error."""
    logits = model(x)
    wrong = (logits.detach().argmax(1) != y).sum()
    smoothing = cfg.train.label_smoothing if cfg is not None else 0.0
    return F.cross_entropy(logits, y, label_smoothing=smoothing), wrong


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
