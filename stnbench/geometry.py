"""Sampling grids for spatial transforms: parameters in, grid out.

Convention, used everywhere in stnbench (the dataset distortions and the spatial transformer):

- Coordinates are grid_sample's normalised (x, y): x to the right, y down, both in [-1, 1],
  with align_corners=False, so pixel j of a row of W pixels has its centre at x = (2j + 1) / W - 1.
- A grid maps each *output* pixel to the *input* location it samples (output -> input). A
  transform's parameters describe that map, as in torch.nn.functional.affine_grid.

Kinds and their parameter layouts, (B, P), registered once in ``KINDS``:

- ``affine``: theta (2, 3) row-major, P = 6; (x, y) -> theta @ (x, y, 1).
- ``attention``: (s, tx, ty), P = 3; theta = [[s, 0, tx], [0, s, ty]].
- ``projective``: the homography (3, 3) row-major without h33, which is fixed to 1, P = 8;
  (x, y) -> (h11 x + h12 y + h13, h21 x + h22 y + h23) / (h31 x + h32 y + 1); pixels beyond
  the horizon (the denominator <= 1e-20, HORIZON) sample nothing.
- ``tps``: a thin plate spline through 16 control points on a regular 4x4 grid spanning
  [-1, 1]^2, ordered row by row (y outer, x inner). The parameters are the input locations the
  control points map to, (x, y) each, P = 32. Radial basis U(r) = r^2 log r^2.
- ``similarity``: (log_scale, rotation, tx, ty), P = 4; theta = [[s cos r, -s sin r, tx],
  [s sin r, s cos r, ty]] with s = exp(log_scale), r = rotation in radians. A log-scale: the
  identity is all zeros and every real value is a valid positive scale. r turns x towards y,
  which is down: the sampled locations turn clockwise on screen, so the output's content turns
  counter-clockwise by r (r = pi/2 is torch.rot90 of a square image).
- ``rigid``: (rotation, tx, ty), P = 3; the similarity with log_scale = 0.

Every kind's identity (``identity(kind)``) gives the grid of pixel centres itself.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
from torch import Tensor

from stnbench.errors import StnbenchError

MODES = ("bilinear", "nearest")
TPS_GRID = 4  # control points per side


@dataclass(frozen=True)
class Kind:
    """One transform kind: a row of the ``KINDS`` table.

    ``identity(dtype=..., device=...)`` returns the parameters (P,) whose grid is the pixel
    centres; ``grid(params, size)`` maps parameters (B, P) and an output size (H, W) to a
    sampling grid (B, H, W, 2), unchecked (the public ``grid`` validates).
    """

    name: str
    names: str  # a name per parameter, space-separated, in layout order; P is their number
    identity: Callable[..., Tensor]
    grid: Callable[[Tensor, tuple[int, int]], Tensor]
    label: str  # in table rows: "ST-CNN Aff"


def pixel_centres(size: tuple[int, int], dtype=torch.float32, device=None) -> Tensor:
    """Normalised (x, y) centres of an H x W image's pixels, (H, W, 2); align_corners=False."""
    h, w = size
    ys = (2 * torch.arange(h, dtype=dtype, device=device) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=dtype, device=device) + 1) / w - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], dim=-1)  # (H, W, 2)


def tps_control_points(dtype=torch.float32, device=None) -> Tensor:
    """The 16 control points, (16, 2) as (x, y), on a 4x4 grid over [-1, 1]^2, y outer."""
    t = torch.linspace(-1.0, 1.0, TPS_GRID, dtype=dtype, device=device)
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)  # (16, 2)


def _tps_kernel(d2: Tensor) -> Tensor:
    """U(r) = r^2 log r^2 from squared distances, with U(0) = 0."""
    return torch.where(d2 > 0, d2 * torch.log(d2.clamp_min(1e-30)), torch.zeros_like(d2))


@lru_cache(maxsize=64)
def _homogeneous(size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pixel centres as homogeneous (x, y, 1), (3, H*W): affine and projective maps are
    linear on it."""
    q = pixel_centres(size, torch.float64).reshape(-1, 2)  # (H*W, 2)
    xy1 = torch.cat([q, torch.ones(len(q), 1, dtype=torch.float64)], dim=1)  # (H*W, 3)
    return xy1.T.contiguous().to(dtype=dtype, device=device)  # (3, H*W)


@lru_cache(maxsize=64)
def _tps_basis(size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Basis (16, H*W), one row per control point, so that grid = targets @ basis.

    With control points c and targets p, the spline f(q) = a0 + a1 x + a2 y + sum_i w_i U(|q - c_i|)
    solves [[K, P], [P^T, 0]] [w; a] = [p; 0]; that system depends on c alone, so it is solved
    once, in float64, and folded into the basis.
    """
    q = pixel_centres(size, torch.float64).reshape(-1, 2)  # (H*W, 2)
    c = tps_control_points(torch.float64)  # (16, 2)
    n = len(c)
    poly = torch.cat([torch.ones(n, 1, dtype=torch.float64), c], dim=1)  # (16, 3)
    system = torch.zeros(n + 3, n + 3, dtype=torch.float64)
    system[:n, :n] = _tps_kernel(torch.cdist(c, c) ** 2)
    system[:n, n:] = poly
    system[n:, :n] = poly.T
    solve = torch.linalg.inv(system)[:, :n]  # (19, 16): [w; a] = solve @ p
    kernel = _tps_kernel(torch.cdist(q, c) ** 2)  # (H*W, 16)
    ones = torch.ones(len(q), 1, dtype=torch.float64)
    basis = torch.cat([kernel, ones, q], dim=1) @ solve  # (H*W, 16)
    return basis.T.contiguous().to(dtype=dtype, device=device)  # (16, H*W)


# One grid function per kind: params (B, P), size (H, W) -> grid (B, H, W, 2). The linear ones
# are one GEMM for the whole batch, so their result is a view of channels-first memory.


def _affine_grid(theta: Tensor, size: tuple[int, int]) -> Tensor:
    """theta (B, 6), row-major (2, 3): (x, y) -> theta @ (x, y, 1)."""
    b, (h, w) = len(theta), size
    basis = _homogeneous(size, theta.dtype, theta.device)  # (3, H*W)
    out = (theta.reshape(b * 2, 3) @ basis).view(b, 2, h, w)  # rows of theta on (x, y, 1)
    return out.permute(0, 2, 3, 1)  # (B, H, W, 2)


def _attention_grid(params: Tensor, size: tuple[int, int]) -> Tensor:
    """(s, tx, ty) (B, 3): (x, y) -> s (x, y) + (tx, ty)."""
    xy = pixel_centres(size, params.dtype, params.device)  # (H, W, 2)
    return xy * params[:, None, None, :1] + params[:, None, None, 1:]  # (B, H, W, 2)


HORIZON = 1e-20  # the least w a pixel is dehomogenised by (_projective_grid)


def _projective_grid(params: Tensor, size: tuple[int, int]) -> Tensor:
    """Homography (B, 8), row-major without h33 = 1: (x, y, 1) -> H (x, y, 1), dehomogenised.

    Output pixels at or beyond the horizon (w = h31 x + h32 y + 1 <= HORIZON, the side away
    from the output's centre, where w = 1) are divided by HORIZON instead, which puts them
    about 1e20 outside the input, where they sample nothing and get no gradient. Divided by
    their own w, they could read a mirrored copy of the input, and at w = 0 an infinite
    location, which grid_sample makes NaN (as it does from about 3e38): a P digit's NaN pixel
    at epoch 317 of seed 0's fresh draws ended a 150k-step run. (A pixel beyond the horizon
    whose numerators are both exactly 0 would sample the input's centre.) The pixels in view
    are divided as before, bit for bit, at the cost of one clamp."""
    b, (h, w) = len(params), size
    rows = torch.cat([params, torch.ones_like(params[:, :1])], dim=1).view(b * 3, 3)  # rows of H
    out = (rows @ _homogeneous(size, params.dtype, params.device)).view(b, 3, h, w)
    return (out[:, :2] / out[:, 2:].clamp_min(HORIZON)).permute(0, 2, 3, 1)  # (B, H, W, 2)


def _tps_grid(params: Tensor, size: tuple[int, int]) -> Tensor:
    """Control point targets (B, 32), (x, y) each: the thin plate spline through them."""
    b, (h, w) = len(params), size
    targets = params.view(b, -1, 2).transpose(1, 2).reshape(b * 2, -1)  # (B*2, 16): x, y rows
    out = (targets @ _tps_basis(size, params.dtype, params.device)).view(b, 2, h, w)
    return out.permute(0, 2, 3, 1)  # (B, H, W, 2)


def _tps_identity(dtype=torch.float32, device=None) -> Tensor:
    return tps_control_points(dtype, device).reshape(-1)  # (32,): each point maps to itself


def _similarity_grid(params: Tensor, size: tuple[int, int]) -> Tensor:
    """(log_scale, rotation, tx, ty) (B, 4): (x, y) -> exp(log_scale) R(rotation) (x, y) + t."""
    log_scale, rotation, tx, ty = params.unbind(1)  # (B,) each
    scale = log_scale.exp()
    cos, sin = scale * rotation.cos(), scale * rotation.sin()
    theta = torch.stack([cos, -sin, tx, sin, cos, ty], dim=1)  # (B, 6): row-major (2, 3)
    return _affine_grid(theta, size)


def _rigid_grid(params: Tensor, size: tuple[int, int]) -> Tensor:
    """(rotation, tx, ty) (B, 3): the similarity with log_scale = 0."""
    return _similarity_grid(F.pad(params, (1, 0)), size)  # (B, 4): log_scale = 0 in front


def _constant(*values: float) -> Callable[..., Tensor]:
    """An identity that is a fixed parameter vector: call it with dtype= and device=."""
    return partial(torch.tensor, [float(v) for v in values])


_TPS_NAMES = " ".join(f"{axis}{i:02d}" for i in range(TPS_GRID * TPS_GRID) for axis in "xy")

# The registry of transform kinds: a new kind is one row here (and a conf/transform/ file).
KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind("affine", "a11 a12 tx a21 a22 ty", _constant(1, 0, 0, 0, 1, 0), _affine_grid, "Aff"),
        Kind("attention", "s tx ty", _constant(1, 0, 0), _attention_grid, "Att"),
        Kind(
            "projective",
            "h11 h12 h13 h21 h22 h23 h31 h32",
            _constant(1, 0, 0, 0, 1, 0, 0, 0),
            _projective_grid,
            "Proj",
        ),
        Kind("tps", _TPS_NAMES, _tps_identity, _tps_grid, "TPS"),
        Kind(
            "similarity", "log_scale rotation tx ty", _constant(0, 0, 0, 0), _similarity_grid, "Sim"
        ),
        Kind("rigid", "rotation tx ty", _constant(0, 0, 0), _rigid_grid, "Rigid"),
    )
}


def _kind(kind: str) -> Kind:
    if kind not in KINDS:
        raise StnbenchError(f"unknown transform kind {kind!r}; expected one of {', '.join(KINDS)}")
    return KINDS[kind]


def num_params(kind: str) -> int:
    """Number of parameters P of a transform kind."""
    return len(param_names(kind))


def param_names(kind: str) -> list[str]:
    """A name for each of a kind's parameters, in layout order (for logs and histograms)."""
    return _kind(kind).names.split()


def identity(kind: str, dtype=torch.float32, device=None) -> Tensor:
    """Parameters (P,) of the identity transform of a kind."""
    return _kind(kind).identity(dtype=dtype, device=device)


def grid(kind: str, params: Tensor, size: tuple[int, int]) -> Tensor:
    """Sampling grid (B, H, W, 2) of output size ``size`` = (H, W) for parameters (B, P).

    Each output pixel holds the normalised (x, y) input location it samples; see the module
    docstring for the convention and the parameter layouts. The result may be a view of
    channels-first memory (one GEMM for the whole batch); call .contiguous() before .view() on it.
    """
    entry = _kind(kind)
    p = len(entry.names.split())
    if not isinstance(params, Tensor) or params.ndim != 2 or params.shape[1] != p:
        got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise StnbenchError(f"params for kind {kind!r} must have shape (B, {p}); got {got}")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise StnbenchError(f"size must be (H, W) with positive integers; got {size!r}")
    return entry.grid(params, tuple(size))


def homography(src: Tensor, dst: Tensor) -> Tensor:
    """Projective params (B, 8) of the homography taking 4 points src (B, 4, 2) to dst (B, 4, 2).

    For a grid, src are output locations and dst the input locations they sample.
    """
    if src.shape[-2:] != (4, 2) or dst.shape != src.shape or src.ndim != 3:
        raise StnbenchError(
            f"homography needs src and dst of shape (B, 4, 2); got "
            f"{tuple(src.shape)} and {tuple(dst.shape)}"
        )
    x, y = src.unbind(-1)  # (B, 4)
    u, v = dst.unbind(-1)
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    # u (h31 x + h32 y + 1) = h11 x + h12 y + h13, and likewise for v: 8 equations, 8 unknowns
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)  # (B, 4, 8)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # (B, 8, 8)
    return torch.linalg.solve(a, torch.cat([u, v], dim=1))  # (B, 8)


def check_mode(mode: str) -> str:
    """``mode`` if it is a sampling mode grid_sample takes here (MODES), else a one-line error."""
    if mode not in MODES:
        raise StnbenchError(f"unknown sampling mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def sample(images: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """Sample images (B, C, H_in, W_in) at a grid (B, H, W, 2) -> (B, C, H, W).

    Outside the input reads as zero. ``mode`` is "bilinear" (the paper's kernel) or "nearest"
    (the paper's integer sampling kernel).
    """
    mode = check_mode(mode)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=False)


def warp(
    images: Tensor,
    kind: str,
    params: Tensor,
    size: tuple[int, int] | None = None,
    mode: str = "bilinear",
) -> Tensor:
    """grid + sample: warp images (B, C, H_in, W_in) to size (H, W), default the input's size."""
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    return sample(images, grid(kind, params, size), mode)
