"""How much of each digit a distorted test set keeps: a measure of how destructive a recipe is.

Each test digit is warped with the recipe's own draws (the ones its fixed test set was made with)
onto a canvas 3x as wide with the same centre and pixel size; the ink that lands outside the real
canvas is cut off in the dataset. Printed per recipe: the ink on a digit relative to the original
28x28 digit (a warp that shrinks a digit shrinks its ink with its area), and the share of digits
that lose more than 10% or 25% of their ink over the canvas edge. Affine and projective recipes.

    python scripts/dataset_ink.py [--data p,rts,r] [--seed 0]
"""

import argparse

import torch

from stnbench import data, distortions, geometry

WIDER = 3


def wide_params(kind: str, params: torch.Tensor) -> torch.Tensor:
    """The same warp on a canvas WIDER times as wide: the output's (x, y) scaled by WIDER."""
    n = len(params)
    if kind == "affine":
        theta = params.view(n, 2, 3).clone()
        theta[:, :, :2] *= WIDER
        return theta.reshape(n, 6)
    if kind == "projective":  # h33 stays 1: only the x and y columns scale
        h = torch.cat([params, torch.ones(n, 1)], dim=1).view(n, 3, 3)
        h[:, :, :2] *= WIDER
        return h.reshape(n, 9)[:, :8]
    raise SystemExit(f"{kind} recipes are not measured here (affine and projective only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="p,rts,r")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    digits, _ = data.mnist_split("test")
    digits = digits[:, None].float() / 255
    original = digits.sum((1, 2, 3))
    print("recipe | ink / original: median, 5th percentile | ink lost off the canvas: >10%, >25%")
    for name in args.data.split(","):
        rec = data.recipe(name)
        gen = distortions.generator(rec, "test", args.seed)
        kind, params = distortions.sample_transform(rec, len(digits), gen)
        c = rec.canvas
        big = geometry.warp(digits, kind, wide_params(kind, params), (WIDER * c, WIDER * c))
        big = torch.nan_to_num(big)  # a homography's horizon inside the wide canvas
        lo = (WIDER * c - c) // 2
        kept = big[..., lo : lo + c, lo : lo + c].sum((1, 2, 3))
        total = big.sum((1, 2, 3))
        lost = 1 - kept / total.clamp_min(1e-6)
        ratio = kept / original
        print(
            f"{name} | {ratio.median():.2f}, {ratio.quantile(0.05):.2f} | "
            f"{(lost > 0.1).float().mean() * 100:.1f}%, {(lost > 0.25).float().mean() * 100:.1f}%"
        )


if __name__ == "__main__":
    main()
