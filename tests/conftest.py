import shutil
import sys
from pathlib import Path

import pytest

from stnbench import mnist


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST data root, fetched once per machine ($STNBENCH_DATA_ROOT or the cache)."""
    return mnist.fetch()


@pytest.fixture
def mnist_copy(mnist_root, tmp_path) -> Path:
    """A private copy of the data root, for tests that damage files."""
    shutil.copytree(mnist_root / mnist.RAW, tmp_path / "data" / mnist.RAW)
    return tmp_path / "data"


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """Where this environment's console scripts are installed."""
    return Path(sys.executable).parent
