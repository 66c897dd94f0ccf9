"""The paper's distorted MNIST recipes (Appendix A.4) as seeded, batched warps on stnbench.geometry.

A recipe turns each 28x28 MNIST digit into a canvas x canvas image with one warp, straight from
the digit into the canvas (affine for rotation, shear, scale and translation; projective for P;
thin plate spline for E), then optionally adds clutter and clips to [0, 1]. In pixels about the
image centres a digit point p lands at A p + t, A = R(rotation) Sh(shear) S(scale); the warp
itself runs the other way (output -> input, stnbench.geometry's convention). docs/datasets.md
("How a recipe is drawn") gives each recipe's draws: P's corner offsets and their redraws, E's
control points, TC's clutter.

Random draws are made on the CPU from a torch.Generator, in a fixed order (transform, then
clutter), so a dataset does not depend on the device the warp runs on, and turning clutter off
leaves the digits where they were.
"""

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from stnbench import geometry
from stnbench.errors import Checked, StnbenchError, describe, integer, number, setting

DIGIT = 28  # MNIST's side, pixels
VERSION = 1  # bump when the generator's output for a recipe changes: it keys the caches


def _interval(v) -> bool:
    return len(v) == 2 and number(0, lo_open=True)(v[0]) and number(v[0])(v[1])


@dataclass(unsafe_hash=True)  # hashable: caches key on it
class Recipe(Checked):
    """One distortion recipe; every field is a config value (conf/data/<name>.yaml, ``recipe:``,
    which holds only what differs from these defaults)."""

    key: ClassVar[str] = "data.recipe"

    # output side, pixels; at least the digit's (a smaller canvas would crop every digit)
    canvas: int = setting(DIGIT, f"an integer >= {DIGIT} (MNIST's side)", integer(DIGIT))
    # degrees: angle ~ U[-rotation, rotation]
    rotation: float = setting(0.0, "a number >= 0", number(0))
    shear: float = setting(0.0, "a number in [0, 90)", number(0, 90, hi_open=True))  # x-shear
    # factor ~ U[lo, hi]
    scale: tuple[float, float] = setting((1.0, 1.0), "[lo, hi] with 0 < lo <= hi", _interval)
    # shift so the scaled 28x28 box lands uniformly anywhere inside the canvas
    place: bool = False
    # extra shift ~ U[-t, t] x canvas per axis (torchvision's convention)
    translation: float = setting(0.0, "a number >= 0", number(0))
    corner_sigma: float = setting(0.0, "a number >= 0", number(0))  # px: projective corners
    # the corner offsets shrink with the digit (perspective drawn at 28 px, then scaled)
    perspective_first: bool = False
    tps_sigma: float = setting(0.0, "a number >= 0", number(0))  # px: TPS control points
    # patches cut from other digits of the split, added, then clipped to [0, 1]
    clutter: int = setting(0, "an integer >= 0", integer(0))
    clutter_size: int = setting(6, "an integer >= 1", integer(1))  # patch side, pixels
    # digits per image, each distorted on its own into a channel of its own; the label is their
    # sum (2: the paper's MNIST addition, Appendix A.1)
    digits: int = setting(1, "an integer >= 1", integer(1))

    def __post_init__(self):
        super().__post_init__()
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if self.corner_sigma > 0 and self.tps_sigma > 0:
            raise self.bad("tps_sigma", "0 when corner_sigma is set (one warp kind per recipe)")
        if self.clutter_size > min(DIGIT, self.canvas):
            raise self.bad("clutter_size", f"an integer in [1, {min(DIGIT, self.canvas)}]")

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        """A recipe from config values, checked as Hydra checks data.recipe."""
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
        except OmegaConfBaseException as e:
            raise StnbenchError(describe(e)) from None

    @property
    def kind(self) -> str:
        """The stnbench.geometry kind of the warp."""
        if self.corner_sigma > 0:
            return "projective"
        return "tps" if self.tps_sigma > 0 else "affine"

    def key_digest(self) -> str:
        """Short digest of the recipe and the generator version: it keys caches and draws."""
        values = dataclasses.asdict(self)
        for name in ("rotation", "shear"):  # integers in version 1's configs: the same digests
            if float(values[name]).is_integer():
                values[name] = int(values[name])
        for name, off in (("perspective_first", False), ("digits", 1)):  # added later: recipes
            if values[name] == off:  # without them keep their digests
                del values[name]
        text = json.dumps({"version": VERSION, **values}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def generator(recipe: Recipe, split: str, seed: int) -> torch.Generator:
    """The CPU generator of one fixed dataset: distinct for every recipe, split and seed."""
    digest = hashlib.sha256(f"{recipe.key_digest()}/{split}/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def sample_transform(recipe: Recipe, n: int, gen: torch.Generator) -> tuple[str, Tensor]:
    """Draw n warps: (kind, params (n, P)) mapping canvas pixels to the 28x28 digit they sample."""
    f64 = torch.float64

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=gen, dtype=f64)

    s = uniform(*recipe.scale)
    rot = torch.deg2rad(uniform(-recipe.rotation, recipe.rotation))
    shear = torch.tan(torch.deg2rad(uniform(-recipe.shear, recipe.shear)))
    room = (recipe.canvas - DIGIT * s).clamp_min(0) / 2 * recipe.place  # 0 unless placed
    t = uniform(-1, 1, 2) * (room + recipe.translation * recipe.canvas)[:, None]  # (n, 2) px

    cos, sin = torch.cos(rot), torch.sin(rot)
    r = torch.stack([cos, -sin, sin, cos], dim=1).view(n, 2, 2)
    sh = torch.eye(2, dtype=f64).repeat(n, 1, 1)
    sh[:, 0, 1] = shear
    a = r @ sh * s[:, None, None]  # (n, 2, 2): digit px -> canvas px, about the centres
    a_inv = torch.linalg.inv(a)
    half_in, half_out = DIGIT / 2, recipe.canvas / 2  # px per normalised unit

    if recipe.kind == "projective":
        corners = torch.tensor([[-1.0, -1], [1, -1], [-1, 1], [1, 1]], dtype=f64)  # (4, 2)
        square = (corners * half_in) @ a.transpose(1, 2) + t[:, None]  # (n, 4, 2) px
        shrink = s if recipe.perspective_first else torch.ones_like(s)
        sigma = recipe.corner_sigma * shrink[:, None, None]  # (n, 1, 1) px
        landed = square + sigma * torch.randn(n, 4, 2, generator=gen, dtype=f64)
        while (bad := ~_convex(landed)).any():  # a folded quad is no view of a square: redraw
            redraw = torch.randn(int(bad.sum()), 4, 2, generator=gen, dtype=f64)
            landed[bad] = square[bad] + sigma[bad] * redraw
        return "projective", geometry.homography(landed / half_out, corners.expand(n, 4, 2)).float()
    if recipe.kind == "tps":
        ctrl = geometry.tps_control_points(f64) * half_out  # (16, 2) canvas px
        offsets = recipe.tps_sigma * torch.randn(n, 16, 2, generator=gen, dtype=f64)
        src = (ctrl + offsets - t[:, None]) @ a_inv.transpose(1, 2) / half_in  # (n, 16, 2)
        return "tps", src.reshape(n, 32).float()
    theta = torch.cat([a_inv * half_out / half_in, -(a_inv @ t[..., None]) / half_in], dim=2)
    return "affine", theta.reshape(n, 6).float()  # (n, 2, 3) row-major


def _convex(corners: Tensor) -> Tensor:
    """Whether quads (n, 4, 2), corners ordered TL, TR, BL, BR, are convex with a square's turn."""
    ring = corners[:, [0, 1, 3, 2]]  # (n, 4, 2) in order round the quad
    edge = ring.roll(-1, dims=1) - ring
    after = edge.roll(-1, dims=1)
    turn = edge[..., 0] * after[..., 1] - edge[..., 1] * after[..., 0]
    return (turn > 0).all(dim=1)  # y points down: a square's corners turn the positive way


def sample_clutter(recipe: Recipe, n: int, n_sources: int, gen: torch.Generator):
    """Draw clutter for n images: sources (n, K), crop corners (n, K, 2), canvas corners (n, K, 2).

    Source k of image i is another digit of the set than the i-th.
    """
    k, size = recipe.clutter, recipe.clutter_size
    other = torch.randint(1, max(n_sources, 2), (n, k), generator=gen)
    sources = (torch.arange(n)[:, None] + other) % n_sources
    crops = torch.randint(0, DIGIT - size + 1, (n, k, 2), generator=gen)  # (x, y) in the digit
    spots = torch.randint(0, recipe.canvas - size + 1, (n, k, 2), generator=gen)  # in the canvas
    return sources, crops, spots


def _add_clutter(canvas: Tensor, digits: Tensor, sources, crops, spots, size: int) -> Tensor:
    """Add size x size patches of digits (M, 28, 28) into canvas (n, 1, C, C); clip to [0, 1]."""
    n, c = canvas.shape[0], canvas.shape[-1]
    r = torch.arange(size, device=canvas.device)
    rows, cols = crops[..., 1, None] + r, crops[..., 0, None] + r  # (n, K, size)
    patches = digits[sources[..., None, None], rows[..., :, None], cols[..., None, :]]  # (n,K,s,s)
    ys, xs = spots[..., 1, None] + r, spots[..., 0, None] + r
    image = torch.arange(n, device=canvas.device)[:, None, None, None]
    flat = (image * c + ys[..., :, None]) * c + xs[..., None, :]  # (n, K, s, s) into (n*C*C,)
    out = canvas.reshape(-1).index_add(0, flat.reshape(-1), patches.reshape(-1))
    return out.view_as(canvas).clamp_(0, 1)


def compose(
    recipe: Recipe, images: Tensor, labels: Tensor, gen: torch.Generator, device=None
) -> tuple[Tensor, Tensor]:
    """A split's images (N, digits, canvas, canvas) and labels: image i's first channel is digit
    i distorted, each further channel a partner digit of the split (drawn from ``gen`` first),
    distorted on its own; the label is the sum of the digits' labels."""
    n = len(images)
    partners = [torch.arange(n)]
    partners += [torch.randint(0, n, (n,), generator=gen) for _ in range(recipe.digits - 1)]
    channels = [distort(recipe, images[p], gen, device=device) for p in partners]
    return torch.cat(channels, dim=1), sum(labels[p] for p in partners)


def distort(
    recipe: Recipe,
    images: Tensor,
    gen: torch.Generator,
    device: str | torch.device | None = None,
    chunk: int = 8192,
) -> Tensor:
    """Distort digits (N, 1, 28, 28) in [0, 1] -> (N, 1, canvas, canvas) in [0, 1], on ``device``.

    Clutter is cut from the other images. The result is on the CPU. One digit per image:
    ``recipe.digits`` is compose()'s.
    """
    n = images.shape[0]
    if images.shape[1:] != (1, DIGIT, DIGIT):
        raise StnbenchError(f"distort needs images (N, 1, 28, 28); got {tuple(images.shape)}")
    device = torch.device(device or "cpu")
    kind, params = sample_transform(recipe, n, gen)
    if recipe.clutter:
        sources = images[:, 0].to(device, torch.float32)
        clutter = sample_clutter(recipe, n, len(sources), gen)
    size = (recipe.canvas, recipe.canvas)
    out = torch.empty(n, 1, *size)
    for i in range(0, n, chunk):
        j = slice(i, i + chunk)
        x = images[j].to(device, torch.float32)
        y = geometry.warp(x, kind, params[j].to(device), size)  # (chunk, 1, C, C)
        if recipe.clutter:
            y = _add_clutter(y, sources, *(c[j].to(device) for c in clutter), recipe.clutter_size)
        out[j] = y.clamp_(0, 1).cpu()
    return out
