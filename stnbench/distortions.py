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
    rotation: float = setting(0.0, number(0))
    shear: float = setting(0.0, number(0, 90, hi_open=True))  # x-shear
    # factor ~ U[lo, hi]
    scale: tuple[float, float] = setting((1.0, 1.0), "[lo, hi] with 0 < lo <= hi", _interval)
    # shift so the scaled 28x28 box lands uniformly anywhere inside the canvas
    place: bool = False
    # extra shift ~ U[-t, t] x canvas per axis (torchvision's convention)
    translation: float = setting(0.0, number(0))
    corner_sigma: float = setting(0.0, number(0))  # px: projective corners
    # the corner offsets shrink with the digit (perspective drawn at 28 px, then scaled)
    perspective_first: bool = False
    tps_sigma: float = setting(0.0, number(0))  # px: TPS control points
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


class Draw:
    """One draw of a split's distortions: every random value drawn up front (cheap), the images
    rendered on demand, ``images(idx)`` being ``compose(...)[0][idx]``, so that training on fresh
    draws renders each batch as it needs it (stnbench.tasks.classify.batches).

    Image i's first channel is digit i distorted, each further channel a partner digit of the
    split (drawn from ``gen`` first), distorted on its own; its label is the sum of the digits'.
    """

    def __init__(self, recipe: Recipe, images: Tensor, labels: Tensor, gen: torch.Generator):
        n = len(images)
        if images.shape[1:] != (1, DIGIT, DIGIT):
            raise StnbenchError(f"a draw needs images (N, 1, 28, 28); got {tuple(images.shape)}")
        partners = [torch.arange(n)]
        partners += [torch.randint(0, n, (n,), generator=gen) for _ in range(recipe.digits - 1)]
        self.recipe, self.labels = recipe, sum(labels[p] for p in partners)
        self.digits = [images, *(images[p] for p in partners[1:])]  # each channel's (N, 1, 28, 28)
        self.plans = [plan(recipe, n, gen) for _ in partners]

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, idx: slice | Tensor, device=None) -> Tensor:
        """Images idx (B, digits, canvas, canvas) in [0, 1], on ``device``."""
        channels = [render(self.recipe, p, d, idx, device)
                    for p, d in zip(self.plans, self.digits, strict=True)]  # fmt: skip
        return channels[0] if len(channels) == 1 else torch.cat(channels, dim=1)


def chunk_size(device: torch.device) -> int:
    """Images rendered at a time into a whole split: 256 on a CPU, whose grids and outputs then
    stay in cache (R's 50k in 0.19 s against 0.42 s at 8192; RTS's in 0.49 s against 0.95 s;
    2-core CPU), else 8192. It changes no value."""
    return 256 if device.type == "cpu" else 8192


def compose(
    recipe: Recipe, images: Tensor, labels: Tensor, gen: torch.Generator, device=None
) -> tuple[Tensor, Tensor]:
    """A split's images (N, digits, canvas, canvas) on the CPU and labels (N,): Draw's, all."""
    draw, device = Draw(recipe, images, labels, gen), torch.device(device or "cpu")
    step = chunk_size(device)
    out = [draw.images(slice(i, i + step), device).cpu() for i in range(0, len(draw), step)]
    return torch.cat(out), draw.labels


@dataclass
class Plan:
    """The random values of n digits' distortions: the warps (kind, params (n, P)) and the
    clutter (sources (n, K), crop corners (n, K, 2), canvas corners (n, K, 2)) or None."""

    kind: str
    params: Tensor
    clutter: tuple[Tensor, Tensor, Tensor] | None


def plan(recipe: Recipe, n: int, gen: torch.Generator) -> Plan:
    """Draw n digits' distortions: the transform, then the clutter."""
    kind, params = sample_transform(recipe, n, gen)
    return Plan(kind, params, sample_clutter(recipe, n, n, gen) if recipe.clutter else None)


def render(recipe: Recipe, p: Plan, digits: Tensor, idx: slice | Tensor, device=None) -> Tensor:
    """Digits idx of digits (N, 1, 28, 28) in [0, 1] distorted by their plan p ->
    (B, 1, canvas, canvas) in [0, 1], on ``device``; clutter is cut from the other digits."""
    device = torch.device(device or "cpu")
    size = (recipe.canvas, recipe.canvas)
    x = digits[idx].to(device, torch.float32)
    y = geometry.warp(x, p.kind, p.params[idx].to(device), size)  # (B, 1, C, C)
    if p.clutter is not None:
        crops = (c[idx].to(device) for c in p.clutter)
        y = _add_clutter(y, digits[:, 0].to(device, torch.float32), *crops, recipe.clutter_size)
    return y.clamp_(0, 1)


def distort(
    recipe: Recipe,
    images: Tensor,
    gen: torch.Generator,
    device: str | torch.device | None = None,
) -> Tensor:
    """Distort digits (N, 1, 28, 28) in [0, 1] -> (N, 1, canvas, canvas) in [0, 1] on the CPU,
    computed on ``device``; clutter is cut from the other images. One digit per image:
    ``recipe.digits`` is Draw's."""
    if images.shape[1:] != (1, DIGIT, DIGIT):
        raise StnbenchError(f"distort needs images (N, 1, 28, 28); got {tuple(images.shape)}")
    p, device = plan(recipe, len(images), gen), torch.device(device or "cpu")
    step = chunk_size(device)
    out = [render(recipe, p, images, slice(i, i + step), device).cpu()
           for i in range(0, len(images), step)]  # fmt: skip
    return torch.cat(out)
