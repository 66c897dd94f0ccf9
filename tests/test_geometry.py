import math

import pytest
import torch
import torch.nn.functional as F

from stnbench import geometry
from stnbench.errors import StnbenchError

KINDS = list(geometry.KINDS)  # every registered kind: the per-kind tests run on each


def rand_params(kind, b, scale=0.1, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = geometry.identity(kind, dtype).expand(b, -1)
    return base + scale * torch.randn(base.shape, generator=g, dtype=dtype)


def images(b=2, c=3, h=9, w=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g, dtype=dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_identity_grid_is_pixel_centres(kind):
    p = geometry.identity(kind, torch.float64).expand(3, -1)
    got = geometry.grid(kind, p, (7, 10))
    want = geometry.pixel_centres((7, 10), torch.float64).expand(3, -1, -1, -1)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", geometry.MODES)
def test_identity_warp_returns_input(kind, mode):
    x = images()
    p = geometry.identity(kind, torch.float64).expand(len(x), -1)
    torch.testing.assert_close(geometry.warp(x, kind, p, mode=mode), x, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_grid_shape_and_param_names(kind):
    p = rand_params(kind, 3)
    assert p.shape == (3, geometry.num_params(kind))
    assert geometry.grid(kind, p, (5, 8)).shape == (3, 5, 8, 2)
    assert geometry.grid(kind, p[:1], (1, 1)).shape == (1, 1, 1, 2)
    names = geometry.param_names(kind)
    assert len(names) == len(set(names)) == geometry.num_params(kind)
    assert f"``{kind}``" in geometry.__doc__  # the module docstring documents its layout


def test_identity_has_documented_layout():
    assert geometry.identity("affine").tolist() == [1, 0, 0, 0, 1, 0]
    assert geometry.identity("attention").tolist() == [1, 0, 0]
    assert geometry.identity("projective").tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    assert geometry.identity("similarity").tolist() == [0, 0, 0, 0]
    assert geometry.identity("rigid").tolist() == [0, 0, 0]
    tps = geometry.identity("tps").view(4, 4, 2)
    levels = torch.tensor([-1, -1 / 3, 1 / 3, 1])
    torch.testing.assert_close(tps[0, :, 0], levels)  # first row: x varies, y = -1
    torch.testing.assert_close(tps[0, :, 1], torch.full((4,), -1.0))
    torch.testing.assert_close(tps[:, 0, 1], levels)  # first column: y varies, x = -1
    assert [geometry.num_params(k) for k in KINDS] == [6, 3, 8, 32, 4, 3]
    assert geometry.param_names("similarity") == ["log_scale", "rotation", "tx", "ty"]
    assert geometry.param_names("rigid") == ["rotation", "tx", "ty"]


@pytest.mark.parametrize("size", [(5, 5), (6, 13), (30, 30)])
def test_affine_grid_equals_torch(size):
    theta = rand_params("affine", 4, scale=0.5)
    want = F.affine_grid(theta.view(-1, 2, 3), (4, 1, *size), align_corners=False)
    torch.testing.assert_close(geometry.grid("affine", theta, size), want, atol=1e-12, rtol=0)


def test_attention_is_affine_without_rotation():
    s, tx, ty = 0.7, 0.2, -0.3
    got = geometry.grid("attention", torch.tensor([[s, tx, ty]]), (8, 9))
    want = geometry.grid("affine", torch.tensor([[s, 0, tx, 0, s, ty]]), (8, 9))
    torch.testing.assert_close(got, want)


def similarity_theta(params):
    """theta (B, 6) = [[s cos, -s sin, tx], [s sin, s cos, ty]], s = exp(log_scale), by hand."""
    rows = []
    for log_scale, rotation, tx, ty in params.tolist():
        s, c, n = math.exp(log_scale), math.cos(rotation), math.sin(rotation)
        rows.append([s * c, -s * n, tx, s * n, s * c, ty])
    return torch.tensor(rows, dtype=params.dtype)


@pytest.mark.parametrize("size", [(5, 5), (6, 13), (30, 30)])
def test_similarity_equals_its_affine_grid(size):
    p = rand_params("similarity", 8, scale=1.0, seed=1)  # rotations and scales well away from 0
    theta = similarity_theta(p)
    got = geometry.grid("similarity", p, size)
    torch.testing.assert_close(got, geometry.grid("affine", theta, size), atol=1e-12, rtol=0)
    want = F.affine_grid(theta.view(-1, 2, 3), (8, 1, *size), align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size", [(5, 5), (6, 13)])
def test_rigid_is_similarity_without_scale(size):
    p = rand_params("rigid", 8, scale=1.0, seed=2)
    with_scale = torch.cat([torch.zeros(8, 1, dtype=p.dtype), p], dim=1)  # log_scale = 0
    got = geometry.grid("rigid", p, size)
    theta = similarity_theta(with_scale)
    torch.testing.assert_close(got, geometry.grid("affine", theta, size), atol=1e-12, rtol=0)
    want = F.affine_grid(theta.view(-1, 2, 3), (8, 1, *size), align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got, geometry.grid("similarity", with_scale, size))


@pytest.mark.parametrize("kind", ["similarity", "rigid"])
def test_quarter_turn_rotates_the_pixel_centres(kind):
    n = 6
    p = torch.zeros(1, geometry.num_params(kind), dtype=torch.float64)
    p[0, -3] = math.pi / 2  # rotation: the third parameter from the end in both layouts
    g = geometry.grid(kind, p, (n, n))[0]  # (n, n, 2)
    c = geometry.pixel_centres((n, n), torch.float64)  # (n, n, 2)
    turned = torch.stack([-c[..., 1], c[..., 0]], dim=-1)  # (x, y) -> (-y, x)
    torch.testing.assert_close(g, turned, atol=1e-12, rtol=0)
    # output pixel (i, j) samples the centre of input pixel (j, n - 1 - i) exactly
    torch.testing.assert_close(g, c.flip(1).transpose(0, 1), atol=1e-12, rtol=0)
    # so the output is the input turned a quarter counter-clockwise, as torch.rot90 turns it
    x = images(h=n, w=n)
    for mode in geometry.MODES:
        out = geometry.warp(x, kind, p.expand(len(x), -1), mode=mode)
        torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-12, rtol=0)
    if kind == "similarity":  # a scale of 2 as well: (x, y) -> (-2y, 2x)
        p[0, 0] = math.log(2.0)
        g = geometry.grid(kind, p, (n, n))[0]
        torch.testing.assert_close(g, 2 * turned, atol=1e-12, rtol=0)


def test_projective_with_affine_homography_equals_affine_warp():
    theta = rand_params("affine", 3, scale=0.3)
    hom = torch.cat([theta, torch.zeros(3, 2, dtype=theta.dtype)], dim=1)  # h31 = h32 = 0
    x = images(b=3)
    torch.testing.assert_close(
        geometry.warp(x, "projective", hom, (12, 8)), geometry.warp(x, "affine", theta, (12, 8))
    )


def test_projective_matches_closed_form():
    h = torch.tensor([[1.1, 0.2, -0.1, -0.15, 0.9, 0.05, 0.2, -0.3]], dtype=torch.float64)
    g = geometry.grid("projective", h, (5, 7))[0]
    (a, b, c, d, e, f, gg, hh) = h[0].tolist()
    for i, j in [(0, 0), (2, 3), (4, 6), (1, 5)]:
        x, y = (2 * j + 1) / 7 - 1, (2 * i + 1) / 5 - 1
        w = gg * x + hh * y + 1
        want = torch.tensor([(a * x + b * y + c) / w, (d * x + e * y + f) / w], dtype=g.dtype)
        torch.testing.assert_close(g[i, j], want, atol=1e-12, rtol=0)


def test_projective_samples_nothing_beyond_the_horizon():
    """w = 4x + 1 is 0 at the second column's centres (x = -0.25 of 4) and negative at the
    first's: those columns are blank, not NaN (1/0) or a mirrored copy (x/w back inside the
    input), the columns in view are the closed form's, and the gradient is finite."""
    h = torch.tensor([[1.0, 0, 0, 0, 1, 0, 4, 0]], requires_grad=True)
    x = torch.arange(1.0, 17).view(1, 1, 4, 4)  # varied, so the gradient is not 0
    out = geometry.warp(x, "projective", h)[0, 0]
    assert out[:, :2].eq(0).all()
    g = geometry.grid("projective", h.detach(), (4, 4))[0]
    torch.testing.assert_close(g[:, 2:, 0], torch.tensor([0.25 / 2, 0.75 / 4]).expand(4, 2))
    assert out[:, 2:].gt(0).all()
    out.sum().backward()
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


def test_projective_keeps_near_infinite_locations_finite():
    """w just above 0 puts a location near infinity, which grid_sample reads as NaN: it is held
    about 1e20 outside, where it samples nothing."""
    tiny = torch.finfo(torch.float32).tiny
    h = torch.tensor([[1.0, 0, 1, 0, 1, 0, 0, -(1 - tiny) / 0.75]])  # w(y = 0.75) about tiny
    out = geometry.warp(torch.ones(1, 1, 4, 4), "projective", h)[0, 0]
    assert torch.isfinite(out).all() and out[3].eq(0).all() and out[0].gt(0).all()


def test_tps_matches_scipy_reference():
    interpolate = pytest.importorskip("scipy.interpolate")
    ctrl = geometry.tps_control_points(torch.float64).numpy()
    targets = rand_params("tps", 2, scale=0.2, seed=3)
    got = geometry.grid("tps", targets.float(), (17, 23))  # the float32 path users run
    query = geometry.pixel_centres((17, 23), torch.float64).reshape(-1, 2).numpy()
    for b in range(2):
        # scipy's thin_plate_spline kernel is r^2 log r: half of U = r^2 log r^2, same spline
        rbf = interpolate.RBFInterpolator(
            ctrl, targets[b].view(16, 2).numpy(), kernel="thin_plate_spline", degree=1
        )
        want = torch.from_numpy(rbf(query)).view(17, 23, 2)
        torch.testing.assert_close(got[b].double(), want, atol=1e-4, rtol=0)


def test_tps_reproduces_affine_maps():
    # targets that are an affine image of the control points give exactly that affine warp
    theta = rand_params("affine", 2, scale=0.3).view(2, 2, 3)
    ctrl = geometry.tps_control_points(torch.float64)  # (16, 2)
    targets = ctrl @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]  # (2, 16, 2)
    torch.testing.assert_close(
        geometry.grid("tps", targets.reshape(2, 32), (9, 14)),
        geometry.grid("affine", theta.reshape(2, 6), (9, 14)),
        atol=1e-10,
        rtol=0,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_grid(kind):
    p = rand_params(kind, 2, scale=0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: geometry.grid(kind, p, (3, 4)), (p,))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", geometry.MODES)
def test_gradcheck_grid_and_sampler(kind, mode):
    x = images(b=2, c=1, h=5, w=6).requires_grad_(True)
    p = rand_params(kind, 2, scale=0.05).requires_grad_(True)

    def f(x, p):
        return geometry.warp(x, kind, p, (4, 5), mode=mode)

    if mode == "nearest":  # piecewise constant in the grid: check the image path only
        assert torch.autograd.gradcheck(lambda x: f(x, p.detach()), (x,))
    else:
        assert torch.autograd.gradcheck(f, (x, p))


def test_output_size_can_differ_from_input():
    x = images(b=2, c=1, h=60, w=60, dtype=torch.float32)
    out = geometry.warp(x, "attention", torch.tensor([[0.5, 0.0, 0.0]] * 2), (30, 30))
    assert out.shape == (2, 1, 30, 30)
    # a 0.5 zoom on the centre: output centre i lands exactly on input centre 15 + i
    torch.testing.assert_close(out, x[:, :, 15:45, 15:45])


def test_bad_input_messages():
    with pytest.raises(
        StnbenchError, match="unknown transform kind 'shear'; expected one of affine"
    ):
        geometry.grid("shear", torch.zeros(1, 6), (4, 4))
    with pytest.raises(StnbenchError, match=r"must have shape \(B, 6\); got \(2, 5\)"):
        geometry.grid("affine", torch.zeros(2, 5), (4, 4))
    with pytest.raises(StnbenchError, match=r"must have shape \(B, 32\); got \(32,\)"):
        geometry.grid("tps", torch.zeros(32), (4, 4))
    with pytest.raises(StnbenchError, match="size must be"):
        geometry.grid("affine", torch.zeros(1, 6), (0, 4))
    with pytest.raises(StnbenchError, match="unknown sampling mode 'bicubic'"):
        geometry.sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, 2), mode="bicubic")
    with pytest.raises(StnbenchError, match="unknown transform kind"):
        geometry.identity("shear")
    with pytest.raises(StnbenchError, match="unknown transform kind"):
        geometry.num_params("shear")
    with pytest.raises(StnbenchError, match="unknown transform kind"):
        geometry.param_names("shear")
    with pytest.raises(StnbenchError, match=r"must have shape \(B, 4\); got \(1, 6\)"):
        geometry.grid("similarity", torch.zeros(1, 6), (4, 4))


def test_homography_maps_its_four_points():
    g = torch.Generator().manual_seed(0)
    square = torch.tensor([[-1.0, -1], [1, -1], [-1, 1], [1, 1]], dtype=torch.float64)
    src = square + 0.2 * torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    dst = 0.8 * square + 0.2 * torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    h = torch.cat([geometry.homography(src, dst), torch.ones(5, 1, dtype=torch.float64)], 1)
    mapped = torch.cat([src, torch.ones(5, 4, 1, dtype=torch.float64)], -1) @ h.view(5, 3, 3).mT
    torch.testing.assert_close(mapped[..., :2] / mapped[..., 2:], dst, atol=1e-10, rtol=0)
    with pytest.raises(StnbenchError, match=r"homography needs src and dst of shape \(B, 4, 2\)"):
        geometry.homography(src[:, :3], dst[:, :3])
