"""Datasets by name and split: ``load(name, split) -> (images, labels)``.

Splits follow the common reproduction of the STN paper: ``train`` is the first 50k images of
MNIST's training set, ``val`` the last 10k, ``test`` MNIST's test set.
"""

import os

import torch
from torch import Tensor

from stnbench import mnist
from stnbench.errors import StnbenchError

SPLITS = ("train", "val", "test")
NAMES = ("plain",)
TRAIN_SIZE = 50_000


def _check(name: str, split: str) -> None:
    if name not in NAMES:
        raise StnbenchError(f"unknown dataset {name!r}; expected one of {', '.join(NAMES)}")
    if split not in SPLITS:
        raise StnbenchError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def mnist_split(split: str, root: str | os.PathLike | None = None) -> tuple[Tensor, Tensor]:
    """Undistorted MNIST split: uint8 images (N, 28, 28) and int64 labels (N,)."""
    _check("plain", split)
    images, labels = mnist.read("test" if split == "test" else "train", root)
    if split == "train":
        return images[:TRAIN_SIZE], labels[:TRAIN_SIZE]
    if split == "val":
        return images[TRAIN_SIZE:], labels[TRAIN_SIZE:]
    return images, labels


def load(
    name: str, split: str, root: str | os.PathLike | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Images float32 (N, 1, H, W) in [0, 1] and labels int64 (N,) of a dataset split.

    ``root`` is the data root (default: $STNBENCH_DATA_ROOT, else the user's cache directory);
    MNIST is fetched there on first use. ``seed`` selects the draw of a distorted dataset.
    """
    _check(name, split)
    images, labels = mnist_split(split, root)
    return images.unsqueeze(1).to(torch.float32).div_(255), labels  # (N, 1, 28, 28)
