"""Where the digit sits in a spatial transformer's output, measured against the known distortion.

The transformer's sampling grid (output -> canvas) composed with the distortion's warp (canvas ->
the original 28x28 digit), both known for a fixed affine test set, maps each output pixel to the
point of the digit it shows. An affine map fitted to that (exact for an affine transformer),
inverted, gives the digit's rotation, zoom (output pixels per digit pixel) and the offset of its
centre from the output's centre (docs/training.md, stnbench-analyse pose).

Angles are in degrees, positive clockwise on screen (y points down), as the recipes draw them.
"""

import math

import torch
from torch import Tensor

from stnbench import distortions, geometry
from stnbench.distortions import DIGIT, Recipe
from stnbench.errors import StnbenchError


def known_warps(rec: Recipe, split: str, seed: int, n: int) -> Tensor:
    """The affine warps (n, 2, 3), canvas -> digit (normalised), that made a fixed affine split."""
    kind, params = distortions.sample_transform(rec, n, distortions.generator(rec, split, seed))
    if kind != "affine" or rec.clutter:
        raise StnbenchError(
            f"the pose is measured on affine distortions without clutter; this recipe is {kind}"
            + (" with clutter" if rec.clutter else "")
        )
    return params.view(n, 2, 3)


def digit_to_output(grid: Tensor, warp: Tensor) -> Tensor:
    """The affine map (B, 2, 3), digit -> output (normalised), of a transformer's grid (B, H, W, 2;
    output -> canvas) composed with the distortions ``warp`` (B, 2, 3; canvas -> digit)."""
    b, h, w, _ = grid.shape
    g = grid.reshape(b, h * w, 2).double()
    warp = warp.double()
    shown = g @ warp[:, :, :2].transpose(1, 2) + warp[:, None, :, 2]  # (B, HW, 2) digit coords
    u = geometry.pixel_centres((h, w), torch.float64, grid.device).reshape(h * w, 2)
    design = torch.cat([u, torch.ones_like(u[:, :1])], dim=1)  # (HW, 3)
    fit = (torch.linalg.pinv(design) @ shown).transpose(1, 2)  # (B, 2, 3): output -> digit
    inv = torch.linalg.inv(fit[:, :, :2])
    return torch.cat([inv, -inv @ fit[:, :, 2:]], dim=2)  # digit -> output


def pose(to_output: Tensor, out_size: int) -> dict[str, Tensor]:
    """Per image: rotation (deg), zoom (output px per digit px) and the centre's offset (dx, dy
    in output px) of digit -> output maps (B, 2, 3) for an output of out_size pixels a side."""
    lin = to_output[:, :, :2] * (out_size / DIGIT)  # pixels per pixel
    angle = torch.atan2(lin[:, 1, 0] - lin[:, 0, 1], lin[:, 0, 0] + lin[:, 1, 1])
    offset = to_output[:, :, 2] * (out_size / 2)
    return {
        "rotation": torch.rad2deg(angle),
        "zoom": torch.linalg.det(lin).abs().sqrt(),
        "dx": offset[:, 0],
        "dy": offset[:, 1],
    }


def summary(p: dict[str, Tensor]) -> dict[str, float]:
    """The spread of the poses over a set of images: what a canonicalising transformer shrinks."""
    z = p["zoom"]
    d2 = p["dx"] ** 2 + p["dy"] ** 2
    return {
        "rotation_mean": p["rotation"].mean().item(),
        "rotation_std": p["rotation"].std().item(),
        "zoom_mean": z.mean().item(),
        "zoom_cv": (z.std() / z.mean()).item(),
        "centre_rms": math.sqrt(d2.mean().item()),
        "position_std": math.sqrt(p["dx"].var().item() + p["dy"].var().item()),
    }


@torch.no_grad()
def measure(transformer, images: Tensor, warp: Tensor, batch: int = 1000) -> dict[str, Tensor]:
    """Per-image poses of the digits in ``transformer``'s outputs (a SpatialTransformer in eval
    mode, or None for the input itself) for images (N, 1, S, S) made by warps (N, 2, 3)."""
    if len(images) != len(warp):
        raise StnbenchError(f"{len(images)} images but {len(warp)} warps; expected one per image")
    size = images.shape[-1]
    out = size if transformer is None else transformer.out_size
    maps = []
    for x, w in zip(images.split(batch), warp.split(batch), strict=True):
        if transformer is None:
            kind, p = "affine", geometry.identity("affine").expand(len(x), 6)
        else:
            kind, p = transformer.kind, transformer.params(x)
        maps.append(digit_to_output(geometry.grid(kind, p, (out, out)).cpu(), w.cpu()))
    return pose(torch.cat(maps), out)
