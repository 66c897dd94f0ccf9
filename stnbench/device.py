"""The ``device`` setting: auto (cuda when available), cpu, cuda or cuda:N."""

import torch

from stnbench.errors import StnbenchError


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not (name in ("cpu", "cuda") or name.startswith("cuda:")):
        raise StnbenchError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StnbenchError(f"device={name} but no CUDA GPU is available; use device=cpu or auto")
    return torch.device(name)
