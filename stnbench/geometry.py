"""Sampling grids for spatial transforms: parameters in, grid out.

Convention, used everywhere in stnbench (the dataset distortions and the spatial transformer):

- Coordinates are grid_sample's normalised (x, y): x to the right, y down, both in [-1, 1],
  with align_corners=False, so pixel j of a row of W pixels has its centre at x = (2j + 1) / W - 1.
- A grid maps each *output* pixel to the *input* location it samples (output -> input). A
  transform's parameters describe that map, as in torch.nn.functional.affine_grid.

Kinds and their parameter layouts, (B, P):

- ``affine``: theta (2, 3) row-major, P = 6; (x, y) -> theta @ (x, y, 1).
- ``attention``: (s, tx, ty), P = 3; theta = [[s, 0, tx], [0, s, ty]].
- ``projective``: the homography (3, 3) row-major without h33, which is fixed to 1, P = 8;
  (x, y) -> (h11 x + h12 y + h13, h21 x + h22 y + h23) / (h31 x + h32 y + 1).
- ``tps``: a thin plate spline through 16 control points on a regular 4x4 grid spanning
  [-1, 1]^2, ordered row by row (y outer, x inner). The parameters are the input locations the
  control points map to, (x, y) each, P = 32. Radial basis U(r) = r^2 log r^2.

Every kind's identity (``identity(kind)``) gives the grid of pixel centres itself.
"""

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from stnbench.errors import StnbenchError

NUM_PARAMS = {"affine": 6, "attention": 3, "projective": 8, "tps": 32}
KINDS = tuple(NUM_PARAMS)
MODES = ("bilinear", "nearest")
TPS_GRID = 4  # control points per side


def _check_kind(kind: str) -> None:
    if kind not in NUM_PARAMS:
        raise StnbenchError(f"unknown transform kind {kind!r}; expected one of {', '.join(KINDS)}")


def num_params(kind: str) -> int:
    """Number of parameters P of a transform kind."""
    _check_kind(kind)
    return NUM_PARAMS[kind]


def param_names(kind: str) -> list[str]:
    """A name for each of a kind's parameters, in layout order (for logs and histograms)."""
    _check_kind(kind)
    if kind == "affine":
        return ["a11", "a12", "tx", "a21", "a22", "ty"]
    if kind == "attention":
        return ["s", "tx", "ty"]
    if kind == "projective":
        return ["h11", "h12", "h13", "h21", "h22", "h23", "h31", "h32"]
    return [f"{axis}{i:02d}" for i in range(TPS_GRID * TPS_GRID) for axis in "xy"]


def tps_control_points(dtype=torch.float32, device=None) -> Tensor:
    """The 16 control points, (16, 2) as (x, y), on a 4x4 grid over [-1, 1]^2, y outer."""
    t = torch.linspace(-1.0, 1.0, TPS_GRID, dtype=dtype, device=device)
    y, x = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2)  # (16, 2)


def identity(kind: str, dtype=torch.float32, device=None) -> Tensor:
    """Parameters (P,) of the identity transform of a kind."""
    _check_kind(kind)
    if kind == "affine":
        return torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=dtype, device=device)
    if kind == "attention":
        return torch.tensor([1.0, 0, 0], dtype=dtype, device=device)
    if kind == "projective":
        return torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0], dtype=dtype, device=device)
    return tps_control_points(dtype, device).reshape(-1)


def pixel_centres(size: tuple[int, int], dtype=torch.float32, device=None) -> Tensor:
    """Normalised (x, y) centres of an H x W image's pixels, (H, W, 2); align_corners=False."""
    h, w = size
    ys = (2 * torch.arange(h, dtype=dtype, device=device) + 1) / h - 1
    xs = (2 * torch.arange(w, dtype=dtype, device=device) + 1) / w - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([x, y], dim=-1)  # (H, W, 2)


def _tps_kernel(d2: Tensor) -> Tensor:
    """U(r) = r^2 log r^2 from squared distances, with U(0) = 0."""
    return torch.where(d2 > 0, d2 * torch.log(d2.clamp_min(1e-30)), torch.zeros_like(d2))


@lru_cache(maxsize=64)
def _basis(kind: str, size: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Basis (K, H*W) on which ``kind``'s map is linear in its parameters, for every output pixel.

    affine and projective: the homogeneous pixel centres (x, y, 1), K = 3.

    tps: K = 16, one row per control point, so that grid = targets @ basis. With control points c
    and targets p, the spline f(q) = a0 + a1 x + a2 y + sum_i w_i U(|q - c_i|) solves
    [[K, P], [P^T, 0]] [w; a] = [p; 0]; that system depends on c alone, so it is solved once, in
    float64, and folded into the basis.
    """
    q = pixel_centres(size, torch.float64).reshape(-1, 2)  # (H*W, 2)
    xy1 = torch.cat([q, torch.ones(len(q), 1, dtype=torch.float64)], dim=1)  # (H*W, 3)
    if kind == "tps":
        c = tps_control_points(torch.float64)  # (16, 2)
        n = len(c)
        poly = torch.cat([torch.ones(n, 1, dtype=torch.float64), c], dim=1)  # (16, 3)
        system = torch.zeros(n + 3, n + 3, dtype=torch.float64)
        system[:n, :n] = _tps_kernel(torch.cdist(c, c) ** 2)
        system[:n, n:] = poly
        system[n:, :n] = poly.T
        solve = torch.linalg.inv(system)[:, :n]  # (19, 16): [w; a] = solve @ p
        kernel = _tps_kernel(torch.cdist(q, c) ** 2)  # (H*W, 16)
        xy1 = torch.cat([kernel, xy1[:, 2:], q], dim=1) @ solve  # (H*W, 16)
    return xy1.T.contiguous().to(dtype=dtype, device=device)  # (K, H*W)


def grid(kind: str, params: Tensor, size: tuple[int, int]) -> Tensor:
    """Sampling grid (B, H, W, 2) of output size ``size`` = (H, W) for parameters (B, P).

    Each output pixel holds the normalised (x, y) input location it samples; see the module
    docstring for the convention and the parameter layouts. The result is a view of channels-first
    memory (one GEMM for the whole batch); call .contiguous() before .view() on it.
    """
    _check_kind(kind)
    p = NUM_PARAMS[kind]
    if not isinstance(params, Tensor) or params.ndim != 2 or params.shape[1] != p:
        got = tuple(params.shape) if isinstance(params, Tensor) else type(params).__name__
        raise StnbenchError(f"params for kind {kind!r} must have shape (B, {p}); got {got}")
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise StnbenchError(f"size must be (H, W) with positive integers; got {size!r}")
    b = params.shape[0]
    h, w = size
    if kind == "attention":
        xy = pixel_centres(size, params.dtype, params.device)  # (H, W, 2)
        return xy * params[:, None, None, :1] + params[:, None, None, 1:]  # (B, H, W, 2)
    if kind == "affine":
        coeffs = params.reshape(b * 2, 3)  # rows of theta
    elif kind == "projective":
        coeffs = torch.cat([params, torch.ones_like(params[:, :1])], dim=1).view(b * 3, 3)
    else:
        coeffs = params.view(b, -1, 2).transpose(1, 2).reshape(b * 2, -1)  # (B*2, 16): x, y rows
    out = (coeffs @ _basis(kind, (h, w), params.dtype, params.device)).view(b, -1, h, w)
    if kind == "projective":
        out = out[:, :2] / out[:, 2:]  # (B, 2, H, W)
    return out.permute(0, 2, 3, 1)  # (B, H, W, 2)


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


def sample(images: Tensor, grid: Tensor, mode: str = "bilinear") -> Tensor:
    """Sample images (B, C, H_in, W_in) at a grid (B, H, W, 2) -> (B, C, H, W).

    Outside the input reads as zero. ``mode`` is "bilinear" (the paper's kernel) or "nearest"
    (the paper's integer sampling kernel).
    """
    if mode not in MODES:
        raise StnbenchError(f"unknown sampling mode {mode!r}; expected one of {', '.join(MODES)}")
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
