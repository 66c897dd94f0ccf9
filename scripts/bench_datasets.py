"""Seconds to build each distorted dataset's 50k training set, end to end, through data.load.

Each build starts from MNIST's IDX files and ends with the cache written (distort, quantise,
atomic save), in a scratch data root that links the real MNIST files, so nothing is reused. For
scale, the same process times a per-image baseline: torchvision's RandomAffine over single
28x28 digits padded to the canvas, the way such distortions are often written. Target: every
recipe under 30 s on the 2-core CPU.

    python scripts/bench_datasets.py [--recipes r,rts,p,e,tc,seed40] [--device cpu] [--csv F]
"""

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from stnbench import data, mnist
from stnbench.device import resolve


def baseline_images_per_s(recipe, digits, n=2000) -> float:
    """Per-image torchvision RandomAffine (rotation, scale, shear) on the padded canvas."""
    pad = (recipe.canvas - 28) // 2
    aug = v2.RandomAffine(
        degrees=recipe.rotation,
        scale=recipe.scale,
        shear=recipe.shear,
        interpolation=v2.InterpolationMode.BILINEAR,
    )
    x = F.pad(digits[:n], [pad, recipe.canvas - 28 - pad] * 2)
    t = time.perf_counter()
    for img in x:
        aug(img)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="r,rts,p,e,tc,seed40")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    device = resolve(args.device)
    real = mnist.fetch()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    digits, _ = data.load("plain", "train")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "MNIST").symlink_to(real / "MNIST")
        for name in args.recipes.split(","):
            t = time.perf_counter()
            images, _ = data.load(name, "train", root=scratch, device=device)
            seconds = time.perf_counter() - t
            size = data.cache_path(name, "train", root=scratch).stat().st_size
            base = baseline_images_per_s(data.recipe(name), digits)
            rows.append(
                {
                    "recipe": name,
                    "images": len(images),
                    "canvas": images.shape[-1],
                    "seconds": round(seconds, 2),
                    "images_per_s": round(len(images) / seconds),
                    "cache_MB": round(size / 2**20, 1),
                    "baseline_per_image_images_per_s": round(base),
                    "speedup": round(len(images) / seconds / base, 1),
                }
            )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
