"""The ``device`` setting: auto (cuda when available), cpu, cuda or cuda:N."""

import re

import torch

from stnbench.errors import StnbenchError


def resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(name, str) or not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]*))?", name):
        raise StnbenchError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StnbenchError(f"device={name} but no CUDA GPU is available; use device=cpu or auto")
    if dev.type == "cuda" and (dev.index or 0) >= (n := torch.cuda.device_count()):
        raise StnbenchError(
            f"device={name} but this machine's CUDA GPUs are cuda:0 to cuda:{n - 1}"
        )
    return dev
