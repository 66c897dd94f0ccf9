import pytest
import torch
import torch.nn.functional as F

from stnbench import geometry
from stnbench.errors import StnbenchError

KINDS = geometry.KINDS


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


def test_identity_has_documented_layout():
    assert geometry.identity("affine").tolist() == [1, 0, 0, 0, 1, 0]
    assert geometry.identity("attention").tolist() == [1, 0, 0]
    assert geometry.identity("projective").tolist() == [1, 0, 0, 0, 1, 0, 0, 0]
    tps = geometry.identity("tps").view(4, 4, 2)
    levels = torch.tensor([-1, -1 / 3, 1 / 3, 1])
    torch.testing.assert_close(tps[0, :, 0], levels)  # first row: x varies, y = -1
    torch.testing.assert_close(tps[0, :, 1], torch.full((4,), -1.0))
    torch.testing.assert_close(tps[:, 0, 1], levels)  # first column: y varies, x = -1
    assert [geometry.num_params(k) for k in KINDS] == [6, 3, 8, 32]


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
        StnbenchError, match="unknown transform kind 'rigid'; expected one of affine"
    ):
        geometry.grid("rigid", torch.zeros(1, 6), (4, 4))
    with pytest.raises(StnbenchError, match=r"must have shape \(B, 6\); got \(2, 5\)"):
        geometry.grid("affine", torch.zeros(2, 5), (4, 4))
    with pytest.raises(StnbenchError, match=r"must have shape \(B, 32\); got \(32,\)"):
        geometry.grid("tps", torch.zeros(32), (4, 4))
    with pytest.raises(StnbenchError, match="size must be"):
        geometry.grid("affine", torch.zeros(1, 6), (0, 4))
    with pytest.raises(StnbenchError, match="unknown sampling mode 'bicubic'"):
        geometry.sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, 2), mode="bicubic")
    with pytest.raises(StnbenchError, match="unknown transform kind"):
        geometry.identity("similarity")


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
