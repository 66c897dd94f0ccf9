"""Datasets by name and split: ``load(name, split) -> (images, labels)``.

A dataset name is a config in the installed package's ``conf/data/`` (``plain``, ``r``, ``rts``,
``p``, ``e``, ``tc``, ``seed40``, ``addition``, or any recipe added there). ``train`` is the first
50k images of MNIST's training set, ``val`` the last 10k, ``test`` MNIST's test set; the i-th
image of a distorted split is the i-th MNIST image of that split, distorted. Distorted splits are
built once per (recipe, split, seed) and cached as uint8 (docs/datasets.md, "Caches and fresh
draws").
"""

import importlib.resources
import os
from functools import lru_cache
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from stnbench import mnist
from stnbench.distortions import DIGIT, Draw, Recipe, compose, generator
from stnbench.errors import StnbenchError, one_line
from stnbench.files import atomic_path

SPLITS = ("train", "val", "test")
TRAIN_SIZE = 50_000
SPLIT_SIZES = {"train": TRAIN_SIZE, "val": 10_000, "test": 10_000}


@lru_cache(maxsize=1)
def recipes() -> dict[str, Recipe | None]:
    """Every configured dataset, name -> recipe (None for plain MNIST), from conf/data/*.yaml."""
    folder = importlib.resources.files("stnbench.conf") / "data"
    yamls = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    found = {f.name.removesuffix(".yaml"): OmegaConf.create(f.read_text())["recipe"] for f in yamls}
    return {name: None if r is None else Recipe.from_dict(r) for name, r in found.items()}


def recipe(name: str) -> Recipe | None:
    """The recipe of a configured dataset (None for plain MNIST)."""
    if name not in recipes():
        raise StnbenchError(f"unknown dataset {name!r}; expected one of {', '.join(recipes())}")
    return recipes()[name]


def shape(rec: Recipe | None) -> tuple[int, int, int]:
    """What a dataset's images and labels look like (plain MNIST's when ``rec`` is None):
    (channels, a digit each; canvas, the images' side in pixels; classes, the labels being
    0 .. classes - 1, the digits' sums)."""
    digits = 1 if rec is None else rec.digits
    return digits, DIGIT if rec is None else rec.canvas, 9 * digits + 1


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise StnbenchError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def mnist_split(split: str, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Undistorted MNIST split: uint8 images (N, 28, 28) and int64 labels (N,)."""
    _check_split(split)
    images, labels = mnist.read("test" if split == "test" else "train", root)
    part = {"train": slice(TRAIN_SIZE), "val": slice(TRAIN_SIZE, None), "test": slice(None)}[split]
    return images[part], labels[part]


def _digits(split: str, root) -> tuple[Tensor, Tensor]:
    images, labels = mnist_split(split, root)
    return images.unsqueeze(1).to(torch.float32).div_(255), labels  # (N, 1, 28, 28)


def _resolve(name: str, split: str, seed, rec: Recipe | None) -> Recipe | None:
    """Check the arguments; the recipe to use: ``rec`` if given, else the configured one."""
    configured = recipe(name)
    _check_split(split)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise StnbenchError(f"seed must be an integer >= 0; got {seed!r}")
    return configured if rec is None else rec


def cache_path(
    name: str, split: str, root=None, seed: int = 0, recipe: Recipe | None = None
) -> Path:
    """Where the fixed dataset ``name`` / ``split`` / ``seed`` is cached (keyed by its recipe)."""
    rec = _resolve(name, split, seed, recipe)
    if rec is None:
        raise StnbenchError("plain MNIST is not cached: it is read from the IDX files")
    folder = mnist.data_root(root) / "distorted" / f"{name}-{rec.key_digest()}"
    return folder / f"{split}-seed{seed}.pt"


def _read_cache(path: Path, n: int, rec: Recipe) -> tuple[Tensor, Tensor]:
    rebuild = "delete it and it is rebuilt"
    try:
        blob = torch.load(path, weights_only=True)
        images, labels = blob["images"], blob["labels"]
    except Exception as e:
        raise StnbenchError(f"{path} is unreadable ({one_line(e)}); {rebuild}") from None
    shape = (rec.digits, rec.canvas, rec.canvas)
    if images.dtype != torch.uint8 or images.shape != (n, *shape) or labels.shape != (n,):
        shown = "x".join(map(str, shape))
        raise StnbenchError(f"{path} does not hold {n} uint8 {shown} images; {rebuild}")
    return images, labels


def load(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    recipe: Recipe | None = None,
    epoch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Images float32 (N, C, H, W) in [0, 1] and labels int64 (N,) of a dataset split; C is the
    recipe's ``digits`` (1 but for addition, whose labels are the sums, 0-18).

    ``root`` is the data root (default: $STNBENCH_DATA_ROOT, else the user's cache directory);
    MNIST is fetched there on first use. ``seed`` selects the draw of a distorted dataset, which
    is built on ``device`` (default cpu) the first time and read from its cache after that.
    ``recipe`` replaces the configured recipe of ``name`` (e.g. with overrides applied).
    ``epoch``: a new draw of the train or val split for that epoch instead, neither cached nor
    quantised (training on fresh distortions every epoch; the test set always stays fixed).
    """
    rec = _resolve(name, split, seed, recipe)
    if epoch is not None and split == "test":
        raise StnbenchError("fresh draws are for train and val; the test set stays fixed")
    if rec is None:
        return _digits(split, root)
    if epoch is not None:
        return compose(
            rec, *_digits(split, root), generator(rec, f"{split}/epoch{epoch}", seed), device
        )
    path = cache_path(name, split, root, seed, rec)
    if path.exists():  # the cache holds the labels too: MNIST is read only to build
        images, labels = _read_cache(path, SPLIT_SIZES[split], rec)
    else:
        out, labels = compose(rec, *_digits(split, root), generator(rec, split, seed), device)
        images = out.mul_(255).round_().to(torch.uint8)
        with atomic_path(path) as tmp:
            torch.save({"images": images, "labels": labels, "recipe": rec.key_digest()}, tmp)
    return images.to(torch.float32).div_(255), labels


def draw(
    name: str,
    split: str,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    epoch: int = 0,
) -> Draw:
    """The fresh draw of a train or val split for ``epoch``, rendered on demand:
    ``draw(...).images(idx, device)`` is ``load(..., epoch=epoch)[0][idx]``."""
    rec = _resolve(name, split, seed, recipe)
    if rec is None or split == "test":
        raise StnbenchError(f"fresh draws are of distorted train or val splits; got {name}/{split}")
    return Draw(rec, *_digits_kept(split, root), generator(rec, f"{split}/epoch{epoch}", seed))


def fixed_draw(
    name: str, split: str, root: str | os.PathLike | None = None, seed: int = 0, recipe=None
) -> Draw:
    """The fixed split's draw, rendered on demand (before load()'s uint8 rounding): for a task
    that needs a few of its images (one class's, task=coloc) and the warps that placed them."""
    rec = _resolve(name, split, seed, recipe)
    if rec is None:
        raise StnbenchError(f"plain MNIST has no draw; got {name}/{split}")
    return Draw(rec, *_digits_kept(split, root), generator(rec, split, seed))


# a fresh run's draw reads its split's digits once, not every epoch (0.1 s an epoch, 4% of an
# ST-FCN epoch on R); Draw only reads them, where load()'s callers may write to theirs
_digits_kept = lru_cache(maxsize=2)(_digits)
