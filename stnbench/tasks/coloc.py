"""Co-localisation (the paper's Appendix A.2): find the common digit in a set of images of one
class, with no boxes and no labels.

An attention transformer (scale and translation, 3 parameters; the paper's localisation net,
stnbench.transformer.loc_coloc) crops 28x28 from each 84x84 image. It is trained with a triplet
hinge loss on the features of a frozen encoder e (the classification CNN trained on plain MNIST
by stnbench itself: its two hidden layers and its logits): over the pairs n != m of a batch,

    max(0, ||e(T(I_n)) - e(T(I_m))||^2 - ||e(T(I_n)) - e(rand(I_n))||^2 + margin),

T(I) the transformer's crop and rand(I) a 28x28 crop at a random place, drawn per step; e's
features are scaled to unit length (``CoLocaliser.features``: as they are, blank crops score
best). The crops start large and zoom in to about the digit's size (``Crops``, ``ceiling``).

The
digit's box comes with the data for evaluation only: the metric is the share (%) of images whose
crop's box has IoU > 0.5 with it (``iou50``; the paper: 100% of T, 75-93% of TC by class).

Splits: ``task.images`` images of class ``data.digit`` from each of MNIST's train, val and test
splits, chosen from the data seed, on the data's recipe (coloc_t, coloc_tc). Targets are the
digits' boxes (N, 4): x0, y0, x1, y1 in the canvas's normalised coordinates ([-1, 1]).
"""

import fcntl
import itertools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from stnbench import data, geometry, models
from stnbench.config import recipe_of
from stnbench.errors import StnbenchError, one_line
from stnbench.tasks import Metric
from stnbench.transformer import SpatialTransformer

log = logging.getLogger(__name__)
METRIC = Metric(name="iou50", unit="%", lower_is_better=False, chance=0.0)  # the identity's: 0
CROP = data.DIGIT  # the transformer's output and the random crops: 28x28
FEATURES = (2, 5, 7)  # the encoder CNN's layers whose outputs are its features: both pools, logits


def settings(cfg: DictConfig) -> dict:
    """What metrics.json records of the task: its name, the class, the centring term's weight
    (its loss), the model it trains."""
    return {"task": "coloc", "digit": cfg.data.digit, "centring": cfg.task.centring,
            "model": "coloc", "transform": "attention", "residual": False, "tanh": False,
            "transformers": 1, "multi": False}  # fmt: skip


def check(cfg) -> None:
    """What the task needs of a config (a DictConfig or stnbench.config.TrainJob, which calls
    this as it is composed): a class, and a placed one-digit recipe."""
    if cfg.data.digit is None:
        raise StnbenchError("data.digit: task=coloc trains on one class; set it to 0-9")
    # a composed DictConfig's recipe is a plain node: recipe_of makes it a Recipe (with .kind)
    rec = recipe_of(cfg) if isinstance(cfg, DictConfig) else cfg.data.recipe
    if rec is None or rec.kind != "affine" or rec.digits != 1 or not rec.place:
        raise StnbenchError(f"data={cfg.data.name}: task=coloc needs a placed one-digit recipe "
                            "(data=coloc_t or coloc_tc)")  # fmt: skip


# --- data ---------------------------------------------------------------------------------------


def boxes(params: Tensor) -> Tensor:
    """The canvas boxes (N, 4) that affine warps (N, 6), canvas -> digit, send the whole 28x28
    digit from: the digit's frame, as the recipe placed it."""
    a = params.double().view(-1, 2, 3)
    corners = torch.tensor([[-1.0, -1], [1, -1], [-1, 1], [1, 1]], dtype=torch.float64)
    # digit d = A c + b, so c = A^-1 (d - b)
    c = (corners[None] - a[:, None, :, 2]) @ torch.linalg.inv(a[:, :, :2]).transpose(1, 2)
    return torch.cat([c.amin(1), c.amax(1)], dim=1).float()  # (N, 4): x0, y0, x1, y1


def crop_boxes(params: Tensor) -> Tensor:
    """The canvas boxes (N, 4) that attention crops (s, tx, ty) (N, 3) sample."""
    s, t = params[:, :1].abs(), params[:, 1:]
    return torch.cat([t - s, t + s], dim=1)


def frame(box: Tensor) -> Tensor:
    """The attention crop (s, tx, ty) (N, 3) that samples boxes (N, 4) that are square, such as
    the digits': half the side, and the centre."""
    return torch.cat([(box[:, 2:3] - box[:, :1]) / 2, (box[:, :2] + box[:, 2:]) / 2], dim=1)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of boxes (N, 4) and (N, 4), x0, y0, x1, y1: (N,)."""
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0)
    inter = wh[:, 0] * wh[:, 1]
    area = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1)
    return inter / (area - inter).clamp_min(1e-12)


def found(params: Tensor, box: Tensor) -> Tensor:
    """Whether each crop (N, 3) finds its digit: IoU > 0.5 with its box (N, 4). (N,) bool."""
    return iou(crop_boxes(params), box) > 0.5


def splits(cfg: DictConfig, dev: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """Each split's ``task.images`` images of class data.digit and their boxes (``split``)."""
    return {name: split(cfg, name, dev) for name in data.SPLITS}


def split(cfg: DictConfig, name: str, dev) -> tuple[Tensor, Tensor]:
    """One split's ``task.images`` images of class data.digit (N, 1, 84, 84) and their digits'
    boxes (N, 4), on the device."""
    check(cfg)  # again: a config read back from a run folder was never composed
    c, idx = cfg.data, members(cfg, name)
    draw = data.fixed_draw(c.name, name, c.root, c.seed, recipe_of(cfg))
    return draw.images(idx, dev), boxes(draw.plans[0].params[idx]).to(dev)


def members(cfg: DictConfig, split: str) -> Tensor:
    """Which images of the split a run uses: task.images of class data.digit, drawn from the
    data seed, in the split's order."""
    c, n = cfg.data, cfg.task.images
    mine = (data.mnist_split(split, c.root)[1] == c.digit).nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(c.seed * 1_000_003 + data.SPLITS.index(split))
    idx = mine[torch.randperm(len(mine), generator=gen)[:n]].sort().values
    if len(idx) < n:
        raise StnbenchError(f"task.images: {split} has {len(idx)} images of {c.digit}; got {n}")
    return idx


def random_crops(n: int, gen: torch.Generator) -> Tensor:
    """n attention params (s, tx, ty) of 28x28 crops placed uniformly at random in an 84x84
    canvas (the loss's rand(I))."""
    s = CROP / 84
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - s)
    return torch.cat([torch.full((n, 1), s), t], dim=1)


def ceiling(cfg: DictConfig, step: int) -> float:
    """The crop's greatest scale at step (0-based): 1 (the whole canvas) at the start, falling
    linearly to task.scale_max over the first task.zoom of training, then held."""
    done = min(1.0, step / (cfg.task.zoom * cfg.train.steps))
    return 1.0 - (1.0 - cfg.task.scale_max) * done


def batches(cfg: DictConfig, d: dict, start: int):
    """Step s's batch: (images (B, 1, 84, 84), (random crops (B, 3), the crop's ceiling at s)),
    a pure function of (seed, s): train.batch_size of the class's training images (all of them
    where it is larger), and a random crop of each."""
    x = d["train"][0]
    b = min(cfg.train.batch_size, len(x))
    for step in itertools.count(start):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randperm(len(x), generator=gen)[:b]
        yield x[idx.to(x.device)], (random_crops(b, gen).to(x.device), ceiling(cfg, step))


# --- the model ----------------------------------------------------------------------------------


class Crops(SpatialTransformer):
    """The attention transformer (s, tx, ty), its crop kept on the canvas and its scale in
    [scale_min, ceiling]: s = scale_min + (ceiling - scale_min) sigmoid(z_s) and t = (1 - s)
    tanh(z_t), z the regression layer's output. It starts at scale ``start`` on the canvas's
    centre. ``ceiling``, set by the loss at every step (``coloc.ceiling``), is a buffer, so that
    a checkpoint holds it and evaluation reads the last step's.

    Why bounded (docs/coloc.md): unbounded, the crops zoom out past the canvas or in to specks,
    which make every image alike; started at the digit's size, they find blank space. Started
    large and made to zoom in, they follow the digits."""

    def __init__(self, canvas: int, scale_min: float, start: float):
        super().__init__("coloc", "attention", canvas, out_size=CROP)
        self.scale_min = scale_min
        self.register_buffer("ceiling", torch.tensor(1.0))
        share = torch.tensor((start - scale_min) / (1 - scale_min))  # of the way to the canvas
        with torch.no_grad():  # sigmoid(z_s) = share; tanh(z_t) = 0: the centre
            self.regress.bias.copy_(torch.cat([share.logit()[None], torch.zeros(2)]))

    def params(self, x: Tensor) -> Tensor:
        z = self.regress(self.loc(x))
        s = self.scale_min + (self.ceiling - self.scale_min) * torch.sigmoid(z[:, :1])
        return torch.cat([s, (1 - s) * torch.tanh(z[:, 1:])], dim=1)


class CoLocaliser(nn.Module):
    """The attention transformer, 84x84 -> 28x28, beside the frozen encoder its loss reads."""

    def __init__(self, transformer: SpatialTransformer, encoder: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.encoder = encoder.requires_grad_(False)

    @property
    def transformers(self) -> list[SpatialTransformer]:
        return [self.transformer]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transformer(x)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: the same features in training and evaluation
        return self

    def features(self, crops: Tensor, unit: bool = True) -> Tensor:
        """The encoder's features of 28x28 crops (B, F): its two hidden layers and its logits,
        concatenated and scaled to unit length. As they are, the triplet loss is least for
        blank crops (0.54 on digit 3, against 31.5 for crops on the digits); at unit length
        it is least on the digits (0.19 against 0.64: scripts/coloc_objective.py)."""
        out, h = [], crops
        for i, layer in enumerate(self.encoder):
            h = layer(h)
            if i in FEATURES:
                out.append(h.flatten(1))
        out = torch.cat(out, dim=1)
        return F.normalize(out, dim=1) if unit else out


def load_config_of(cfg: DictConfig) -> DictConfig:
    """The encoder run's config: stnbench-train's with task.encoder_args."""
    from stnbench.cli import load_config

    return load_config("stnbench_train", list(cfg.task.encoder_args))


def encoder(cfg: DictConfig, dev: torch.device) -> nn.Module:
    """The frozen encoder: the CNN of the run in task.encoder, trained there first (with
    task.encoder_args) if it is not finished. Concurrent runs wait for the one training it."""
    from stnbench.train import train

    folder, args = Path(cfg.task.encoder), list(cfg.task.encoder_args)
    enc_cfg = load_config_of(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocking: one process trains it, the others wait
        done = folder / "metrics.json"
        if not done.exists():
            log.info("task.encoder: training %s first (%s)", folder, " ".join(args))
            train(enc_cfg, folder)
    return load_encoder(folder, enc_cfg, dev)


def load_encoder(folder: Path, enc_cfg: DictConfig, dev: torch.device) -> nn.Module:
    """The encoder CNN of the finished run in ``folder``, checked: a CNN on 28x28 MNIST."""
    from stnbench.rundir import evaluated_weights, load_checkpoint, read_json

    metrics = read_json(folder / "metrics.json")
    if metrics.get("status") != "ok" or metrics.get("model") != "cnn":
        got = f"a {metrics.get('model')} run that ended {metrics.get('status')}"
        raise StnbenchError(f"task.encoder: {folder} holds {got}; expected a CNN that ended ok")
    path = folder / "checkpoint.pt"
    if not path.exists():
        raise StnbenchError(f"task.encoder: {path} is missing; delete {folder} and it is retrained")
    net = models.from_config(OmegaConf.to_container(enc_cfg.model), None, CROP, 10, 1)
    try:
        net.load_state_dict(evaluated_weights(load_checkpoint(path, torch.device("cpu"))))
    except RuntimeError as e:
        raise StnbenchError(f"task.encoder: {path} is not a CNN on 28x28 MNIST as task."
                            f"encoder_args build it ({one_line(e)[:200]})") from None  # fmt: skip
    return net.to(dev).eval()


def build_model(cfg: DictConfig, dev: torch.device, pretrained: bool = True) -> nn.Module:
    """The attention transformer (initialised from the seed) beside the frozen encoder; without
    ``pretrained``, an untrained CNN in its place, for a checkpoint's weights (trained_model)."""
    check(cfg)  # again: a config read back from a run folder was never composed
    if pretrained:
        enc = encoder(cfg, dev)
    else:
        enc_cfg = load_config_of(cfg)
        enc = models.from_config(OmegaConf.to_container(enc_cfg.model), None, CROP, 10, 1)
    torch.manual_seed(cfg.seed)
    t = Crops(recipe_of(cfg).canvas, cfg.task.scale_min, cfg.task.start)
    return CoLocaliser(t, enc).to(dev)


# --- loss and evaluation ------------------------------------------------------------------------


def off_centre(out: Tensor) -> Tensor:
    """How far the ink of crops (B, 1, 28, 28) lies from their centres: the mean squared
    distance of each crop's centre of ink from its centre, in squared half-sides. It reads no
    label or box; a crop with no ink costs nothing (blank crops are the collapse rule's)."""
    xy = geometry.pixel_centres(out.shape[-2:], out.dtype, out.device)  # (H, W, 2)
    ink = out[:, 0].clamp_min(0)  # (B, H, W)
    centre = (ink[..., None] * xy).sum((1, 2)) / ink.sum((1, 2))[:, None].clamp_min(1e-6)
    return centre.pow(2).sum(1).mean()


def triplet(
    model: CoLocaliser, x: Tensor, crops: Tensor, margin: float, centring: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The triplet hinge loss (module doc), its mean over the batch's pairs, plus ``centring``
    times off_centre of the crops (task.centring; the paper's loss has none); the crops'
    params."""
    out, params = model(x)
    rand = geometry.warp(x, "attention", crops, (CROP, CROP))
    a, q = model.features(out), model.features(rand)
    pos = torch.cdist(a, a).pow(2)  # (B, B): ||e(T(I_n)) - e(T(I_m))||^2
    neg = (a - q).pow(2).sum(1, keepdim=True)  # (B, 1): ||e(T(I_n)) - e(rand(I_n))||^2
    hinge = (pos - neg + margin).clamp_min(0)
    pairs = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    value = hinge[pairs].mean()
    return (value + centring * off_centre(out) if centring else value), params


def loss(model, x: Tensor, y: tuple[Tensor, float], cfg: DictConfig | None = None):
    """The training loss on a batch (its random crops and the step's ceiling: ``batches``); no
    training metric (the boxes are for evaluation only)."""
    crops, top = y
    model.transformer.ceiling.fill_(top)
    margin, centring = (cfg.task.margin, cfg.task.centring) if cfg is not None else (1.0, 0.0)
    return triplet(model, x, crops, margin, centring)[0], None


@torch.no_grad()
def evaluate(model, x: Tensor, box: Tensor, batch: int) -> tuple[float, float]:
    """The triplet loss (margin 1, fixed random crops) and iou50 (%) on a split, in batches."""
    gen = torch.Generator().manual_seed(0)
    total, hits = 0.0, 0
    batch += len(x) % batch == 1  # no batch of one image: the loss needs a pair
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        value, params = triplet(model, xb, random_crops(len(xb), gen).to(x.device), 1.0)
        total += value.item() * len(xb)
        hits += int(found(params, box[i : i + batch]).sum())
    return total / len(x), 100.0 * hits / len(x)


# --- the report ---------------------------------------------------------------------------------

COLUMNS = {"coloc_t": "T", "coloc_tc": "TC"}
PAPER = {"coloc_t": "100", "coloc_tc": "75-93"}  # % of images with IoU > 0.5, every class (A.2)


def table(runs) -> tuple["pd.DataFrame", str]:  # noqa: F821
    """stnbench-report's per-class table of co-localisation runs: a row per dataset (and weight
    of the centring term, task.centring, where it is not 0), a column per class, each the mean
    ± std (n) of test iou50 over the runs that ended ok, the mean over classes, and the paper's
    figure. Where a class has runs at several learning rates (a
    search), the lr whose finished runs score the best mean val iou50 (`<class> lr`). Returns
    the table (CSV) and its Markdown."""
    import pandas as pd

    from stnbench.report import STATUSES, cell_text

    runs = runs.assign(digit=runs.digit.astype("Int64"))
    for column in ("test_iou50", "val_iou50", "lr"):
        if column not in runs:  # none has ended yet (or a table made by hand)
            runs = runs.assign(**{column: float("nan")})
    runs = runs.assign(centring=centring_of(runs))  # a row per dataset and weight
    records, shown, means = [], [], {}
    rows = runs[["data", "centring"]].drop_duplicates().itertuples(index=False)
    for name, w in sorted(rows, key=lambda r: (r[0] not in COLUMNS, r[0], r[1])):
        record = {"data": name} | ({"centring": w} if w else {})
        text = {"data": COLUMNS.get(name, name) + (f", centring {w:g}" if w else "")}
        mine = runs[(runs["data"] == name) & (runs.centring == w)]
        for digit in range(10):
            group = mine[mine.digit == digit]
            lr = _best_lr(group) if group.lr.nunique() > 1 else None
            group = group if lr is None else group[group.lr == lr]
            values = group[group.status == "ok"].test_iou50.astype(float)
            means[name, w, digit] = values.mean()
            record |= {f"{digit}": values.mean(), f"{digit} std": values.std(),
                       f"{digit} n": len(values)}  # fmt: skip
            record |= {} if lr is None else {f"{digit} lr": lr}
            cell = {"n": len(values), "mean": values.mean(), "std": values.std(), "dead": 0,
                    **{s: (group.status == s).sum() for s in STATUSES[1:]}}  # fmt: skip
            text[str(digit)] = cell_text(cell, digits=1) + ("" if lr is None else f" @ lr {lr:g}")
        classes = pd.Series([means[name, w, d] for d in range(10)]).dropna()
        record["mean over classes"] = classes.mean() if len(classes) == 10 else float("nan")
        text["mean"] = f"{classes.mean():.1f}" if len(classes) == 10 else ""
        record["paper"] = text["paper"] = PAPER.get(name, "")
        records.append(record)
        shown.append(text)
    md = pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True)
    chosen = any("@ lr" in t for row in shown for t in row.values())
    legend = ("Co-localisation: % of test images whose crop has IoU > 0.5 with the digit's box, "
              "per class: mean ± std over the runs that ended ok (how many); in brackets the runs "
              "that did not"
              + ("; `@ lr`: the learning rate chosen on validation" if chosen else "")
              + ("; `centring`: with the label-free centring term of that weight, not the "
                 "paper's" if runs.centring.any() else "")
              + ". Mean: over the 10 classes' means. Paper: Jaderberg et al. 2015, "
              "Appendix A.2 (T: 100% for every class; TC: 75-93% by class).")  # fmt: skip
    return pd.DataFrame(records), md + "\n\n" + legend + "\n"


def centring_of(runs) -> "pd.Series":  # noqa: F821
    """Each run's task.centring (a runs.csv column): 0 for runs from before it existed, which
    trained without the term."""
    import pandas as pd

    weights = runs["centring"] if "centring" in runs else pd.Series(0.0, runs.index)
    return weights.astype(float).fillna(0.0)


def _best_lr(group) -> float:
    """Of one class's runs at several lrs, the one best on validation (report.selection_score:
    the mean final val iou50 of its finished runs, a diverged one scoring 0); of a tie, the
    smaller lr."""
    from stnbench.report import selection_score

    scores = {lr: selection_score(g, METRIC) for lr, g in group.groupby("lr")}
    return float(min(scores, key=lambda lr: (scores[lr], lr)))
