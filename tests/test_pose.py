"""stnbench.pose: the digit's pose in a transformer's output, against the known distortion."""

import math

import pytest
import torch

from stnbench import distortions, geometry, pose
from stnbench.distortions import Recipe
from stnbench.errors import StnbenchError
from stnbench.transformer import SpatialTransformer

RTS = Recipe(canvas=42, rotation=45, scale=(0.7, 1.2), place=True)


def warps(angles_deg, scales, shifts_px, canvas=42):
    """Affine warps canvas -> digit (normalised) of digits rotated, scaled, then shifted (px)."""
    rot = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    s = torch.tensor(scales, dtype=torch.float64)
    t = torch.tensor(shifts_px, dtype=torch.float64)
    cos, sin = torch.cos(rot), torch.sin(rot)
    a = (
        torch.stack([cos, -sin, sin, cos], 1).view(-1, 2, 2) * s[:, None, None]
    )  # digit -> canvas px
    a_inv = torch.linalg.inv(a)
    half_in, half_out = 14, canvas / 2
    return torch.cat([a_inv * half_out / half_in, -(a_inv @ t[..., None]) / half_in], dim=2)


def test_the_input_pose_is_the_distortion_drawn():
    w = warps([30.0, -10.0, 0.0], [0.8, 1.1, 1.0], [[5.0, -3.0], [0.0, 7.0], [0.0, 0.0]])
    p = pose.measure(None, torch.zeros(3, 1, 42, 42), w.float(), batch=2)
    assert torch.allclose(
        p["rotation"], torch.tensor([30.0, -10.0, 0.0], dtype=torch.float64), atol=1e-3
    )
    assert torch.allclose(p["zoom"], torch.tensor([0.8, 1.1, 1.0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(p["dx"], torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(p["dy"], torch.tensor([-3.0, 7.0, 0.0], dtype=torch.float64), atol=1e-4)


def test_a_transformer_that_undoes_the_distortion_gives_one_pose():
    """Sampling the canvas at warp^-1 composed with a fixed map shows every digit the same way."""
    n = 64
    gen = torch.Generator().manual_seed(0)
    w = warps(
        (torch.rand(n, generator=gen) * 90 - 45).tolist(),
        (torch.rand(n, generator=gen) * 0.5 + 0.7).tolist(),
        (torch.rand(n, 2, generator=gen) * 16 - 8).tolist(),
    )
    canonical = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.6, 0.0]], dtype=torch.float64)  # zoom in
    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(n, 1, 3)
    inv = torch.linalg.inv(torch.cat([w, last_row], dim=1))[:, :2]  # digit -> canvas
    theta = inv[:, :, :2] @ canonical[:, :2]
    theta = torch.cat([theta, inv[:, :, 2:]], dim=2)  # output -> canvas: inv o canonical
    grid = geometry.grid("affine", theta.reshape(n, 6), (42, 42))
    p = pose.pose(pose.digit_to_output(grid, w), 42)
    s = pose.summary(p)
    assert s["rotation_std"] < 1e-6 and abs(s["rotation_mean"]) < 1e-6
    assert s["zoom_cv"] < 1e-9 and s["zoom_mean"] == pytest.approx(1 / 0.6 * 42 / 28)
    assert s["centre_rms"] < 1e-6 and s["position_std"] < 1e-6
    identity = geometry.pixel_centres((42, 42), torch.float64).expand(n, -1, -1, -1)
    raw = pose.summary(pose.pose(pose.digit_to_output(identity, w), 42))
    assert raw["rotation_std"] > 15 and raw["zoom_cv"] > 0.05 and raw["centre_rms"] > 3


def test_the_affine_fit_is_exact_for_a_projective_grid_without_perspective():
    n = 5
    w = warps([20.0] * n, [0.9] * n, [[1.0, 2.0]] * n)
    affine = torch.tensor([[0.8, 0.1, 0.05], [-0.1, 0.8, -0.1]]).expand(n, 2, 3)
    homography = torch.cat([affine.reshape(n, 6), torch.zeros(n, 2)], dim=1)
    via_affine = pose.digit_to_output(geometry.grid("affine", affine.reshape(n, 6), (30, 30)), w)
    via_proj = pose.digit_to_output(geometry.grid("projective", homography, (30, 30)), w)
    assert torch.allclose(via_affine, via_proj, atol=1e-5)


def test_known_warps_are_the_ones_that_made_the_split():
    """The same draws as distort: warping the digits with them gives the distorted images."""
    digits = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    made = distortions.distort(RTS, digits, distortions.generator(RTS, "test", 3))
    w = pose.known_warps(RTS, "test", 3, 16)
    again = geometry.warp(digits, "affine", w.reshape(16, 6), (42, 42)).clamp(0, 1)
    assert torch.allclose(made, again, atol=1e-6)


def test_a_real_transformer_is_measured_batch_by_batch():
    torch.manual_seed(0)
    t = SpatialTransformer("cnn", "affine", 42).eval()
    with torch.no_grad():  # a transformer that zooms in by 2 whatever it sees
        t.regress.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.5, 0.0]))
    w = warps([0.0] * 7, [1.0] * 7, [[0.0, 0.0]] * 7)
    p = pose.measure(t, torch.rand(7, 1, 42, 42), w.float(), batch=3)
    assert p["zoom"].shape == (7,)
    assert torch.allclose(p["zoom"], torch.full((7,), 2.0, dtype=torch.float64), atol=1e-5)
    assert math.isclose(pose.summary(p)["centre_rms"], 0.0, abs_tol=1e-4)


@pytest.mark.parametrize(
    "recipe, word",
    [(Recipe(canvas=28, corner_sigma=2), "projective"), (Recipe(canvas=28, clutter=2), "clutter")],
)
def test_known_warps_refuse_what_is_not_a_plain_affine_distortion(recipe, word):
    with pytest.raises(StnbenchError, match=word):
        pose.known_warps(recipe, "test", 0, 4)
