"""Each recipe's statistics on real MNIST digits (the val split) against its spec."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from stnbench import data, geometry
from stnbench.distortions import Recipe, distort, generator, sample_transform
from stnbench.errors import StnbenchError


@pytest.fixture(scope="module")
def val(mnist_root):
    images, labels = data.load("plain", "val")
    return images, labels


def draw(name, images, split="val", seed=0):
    """The images and warp parameters of a fixed dataset, as load() builds them."""
    rec = data.recipe(name)
    kind, params = sample_transform(rec, len(images), generator(rec, split, seed))
    return distort(rec, images, generator(rec, split, seed)), kind, params


def moments(img):
    """Ink centroid (N, 2), px, and principal-axis angle (N,), degrees, of images (N, 1, H, W)."""
    img = img[:, 0].double()
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    m = img.sum((1, 2))
    cx, cy = (img * xs).sum((1, 2)) / m, (img * ys).sum((1, 2)) / m
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mu20, mu02 = (img * dx**2).sum((1, 2)) / m, (img * dy**2).sum((1, 2)) / m
    mu11 = (img * dx * dy).sum((1, 2)) / m
    return torch.stack([cx, cy], 1), torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def wrap180(deg):
    return (deg + 90) % 180 - 90


def test_r_rotates_ones_over_the_whole_range(val):
    images, labels = val
    ones = images[labels == 1]
    out, kind, theta = draw("r", images)
    assert kind == "affine" and out.shape == images.shape
    theta = theta[labels == 1].view(-1, 2, 2, 3)[..., :2].reshape(-1, 2, 2)  # inverse rotation
    drawn = torch.rad2deg(torch.atan2(theta[:, 0, 1], theta[:, 0, 0])).double()
    turned = wrap180(moments(out[labels == 1])[1] - moments(ones)[1])
    # the measured turn of each '1' follows its drawn angle ...
    assert wrap180(turned - drawn).abs().median() < 3
    # ... and covers the whole +-90 range uniformly
    assert turned.min() < -85 and turned.max() > 85
    assert abs((turned.abs() > 45).double().mean() - 0.5) < 0.06
    assert abs(drawn.std() - 180 / math.sqrt(12)) < 4


def test_rts_places_and_scales_in_the_42_canvas(val):
    images, _ = val
    out, _, theta = draw("rts", images)
    assert out.shape == (len(images), 1, 42, 42)
    a = theta.view(-1, 2, 3)[:, :, :2].double()
    scale = (42 / 28) / torch.linalg.det(a).sqrt()  # theta = (C/28) A^-1, det A = s^2
    assert scale.min() > 0.7 - 1e-6 and scale.max() < 1.2 + 1e-6
    ink = out.sum((1, 2, 3)).double() / images.sum((1, 2, 3)).double()
    # ink follows the scale range: area grows as s^2 in [0.49, 1.44], and the digit stays inside
    assert (ink / scale**2 - 1).abs().median() < 0.01
    # the scaled 28x28 box is placed inside; rotated corners may leave it at the edge, rarely
    assert (ink / scale**2).quantile(0.001) > 0.95 and (ink / scale**2).min() > 0.85
    assert 0.47 < ink.quantile(0.005) < 0.53 and 1.36 < ink.quantile(0.995) < 1.45
    centre, _ = moments(out)
    assert (centre.min(0).values < 11).all() and (centre.max(0).values > 31).all()
    assert (centre.std(0) > 3.5).all()


@pytest.mark.parametrize(
    "name, sigma_px, drawn_first",
    [("p_literal", 5.0, False), ("p", 3.5, True)],  # p: 0.25 of every digit's half-side
)
def test_p_moves_corners_by_its_sigma(val, name, sigma_px, drawn_first):
    images, _ = val
    out, kind, params = draw(name, images)
    assert kind == "projective" and out.shape == images.shape
    # where the digit's corners landed (canvas px): the inverse homography at (+-1, +-1)
    hom = torch.cat([params.double(), torch.ones(len(params), 1, dtype=torch.float64)], 1)
    fwd = torch.linalg.inv(hom.view(-1, 3, 3))
    corners = torch.tensor([[-1.0, -1, 1], [1, -1, 1], [-1, 1, 1], [1, 1, 1]], dtype=torch.float64)
    landed = corners @ fwd.transpose(1, 2)
    landed = landed[..., :2] / landed[..., 2:] * 14  # (N, 4, 2) px
    # fit scale and shift; the residual is the corner noise (5 of 8 degrees of freedom left)
    c = corners[:, :2] * 14
    shift = landed.mean(1, keepdim=True)
    scale = ((landed - shift) * c).sum((1, 2)) / (c * c).sum()
    resid = landed - shift - scale[:, None, None] * c
    if drawn_first:  # drawn on the 28 px digit, then scaled with it
        resid = resid / scale[:, None, None]
    sigma = (resid.pow(2).sum() / (5 * len(resid))).sqrt()
    assert abs(sigma - sigma_px) < 0.05 * sigma_px
    assert abs(scale.mean() - 0.875) < 0.01
    assert 0.6 < (out.sum((1, 2, 3)) / images.sum((1, 2, 3))).mean() < 0.85


def test_perspective_first_shrinks_the_corner_offsets_with_the_digit():
    # the same draws: at scale 0.5, 4 px offsets drawn before scaling are 2 px offsets after it
    first = Recipe(scale=(0.5, 0.5), corner_sigma=4, perspective_first=True)
    after = Recipe(scale=(0.5, 0.5), corner_sigma=2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kind, params = sample_transform(first, 500, gen())
    assert kind == "projective"
    torch.testing.assert_close(params, sample_transform(after, 500, gen())[1])
    literal = sample_transform(dataclasses.replace(after, corner_sigma=4), 500, gen())[1]
    assert not torch.allclose(params, literal)
    # an option added later leaves the datasets made without it as they were (digest of P before)
    assert data.recipe("p_literal").key_digest() == "905d3d52888f"


def test_e_moves_control_points_by_1_5_px_after_scaling(val):
    images, _ = val
    out, kind, params = draw("e", images)
    assert kind == "tps" and out.shape == images.shape
    src = params.double().view(-1, 16, 2) * 14  # digit px sampled by each control point
    ctrl = geometry.tps_control_points(torch.float64) * 14  # canvas px
    inv_scale = (src * ctrl).sum((1, 2)) / (ctrl * ctrl).sum()  # src = (ctrl + e) / s
    resid = (src - inv_scale[:, None, None] * ctrl) / inv_scale[:, None, None]  # = e, px
    sigma = (resid.pow(2).sum() / (31 * len(resid))).sqrt()
    assert abs(sigma - 1.5) < 0.05
    scale = 1 / inv_scale
    assert scale.quantile(0.01) > 0.7 and scale.quantile(0.99) < 1.05  # fit noise ~0.025
    assert abs(scale.mean() - 0.875) < 0.01
    assert (out - images).abs().mean() > 0.02  # the digits really changed


def test_tc_is_digit_plus_six_clutter_patches_clipped(val):
    images, _ = val
    rec = data.recipe("tc")
    out = distort(rec, images, torch.Generator().manual_seed(0))
    alone = distort(dataclasses.replace(rec, clutter=0), images, torch.Generator().manual_seed(0))
    assert out.shape == (len(images), 1, 60, 60)
    assert out.min() >= 0 and out.max() <= 1 and (out == 1).any()
    # the whole digit is inside the canvas, placed all over it
    torch.testing.assert_close(alone.sum((1, 2, 3)), images.sum((1, 2, 3)), rtol=1e-3, atol=1e-3)
    assert (moments(alone)[0].std(0) > 6).all()
    # clutter only adds, within at most 6 patches of 6x6
    added = out - alone
    assert added.min() > -1e-6
    changed = (added > 1e-6).sum((1, 2, 3))
    assert changed.max() <= 6 * 36 and (changed > 0).double().mean() > 0.95


def test_seed40_is_the_seed_notes_recipe(val):
    images, _ = val
    rec = data.recipe("seed40")
    assert (rec.canvas, rec.rotation, rec.shear, rec.translation, rec.scale) == (
        40,
        30,
        20,
        0.25,
        (0.8, 1.2),
    )
    out, kind, _ = draw("seed40", images)
    assert kind == "affine" and out.shape == (len(images), 1, 40, 40)
    assert (moments(out)[0].std(0) > 4).all()  # translation +-10 px: uniform std 5.8


def test_same_seed_same_tensors_other_seed_or_split_other_draws(val):
    images, _ = val
    a, _, pa = draw("e", images[:500])
    b, _, pb = draw("e", images[:500])
    assert torch.equal(a, b) and torch.equal(pa, pb)
    c, _, pc = draw("e", images[:500], seed=1)
    assert not torch.equal(a, c) and not torch.equal(pa, pc)
    _, _, pt = draw("e", images[:500], split="train")
    assert not torch.equal(pa, pt)


def test_load_caches_quantised_dataset_and_reads_it_back(mnist_copy, val):
    images, labels = data.load("rts", "val", root=mnist_copy)
    path = data.cache_path("rts", "val", root=mnist_copy)
    assert path.exists() and path.parent.name.startswith("rts-")
    assert images.shape == (10000, 1, 42, 42) and torch.equal(labels, val[1])
    built = draw("rts", val[0])[0]
    torch.testing.assert_close(images, (built * 255).round() / 255, atol=0, rtol=0)
    mtime = path.stat().st_mtime_ns
    again, _ = data.load("rts", "val", root=mnist_copy)
    assert torch.equal(again, images) and path.stat().st_mtime_ns == mtime
    # an overridden recipe is its own dataset, with its own cache
    other = dataclasses.replace(data.recipe("rts"), canvas=48)
    assert data.load("rts", "val", root=mnist_copy, recipe=other)[0].shape[-1] == 48
    assert data.cache_path("rts", "val", root=mnist_copy, recipe=other) != path
    assert sorted(p.name for p in path.parent.iterdir()) == ["val-seed0.pt"]  # no stray temp files


def test_addition_sums_two_digits_each_rts_distorted_in_its_own_channel(val, mnist_copy):
    plain, plain_labels = val
    images, labels = data.load("addition", "val", root=mnist_copy)
    assert images.dtype == torch.float32 and images.shape == (10_000, 2, 42, 42)
    assert labels.dtype == torch.int64 and labels.min() == 0 and labels.max() == 18
    # the partners are the first draw of the dataset's generator; the label sums both digits
    rec = data.recipe("addition")
    partners = torch.randint(0, 10_000, (10_000,), generator=generator(rec, "val", 0))
    assert torch.equal(labels, plain_labels + plain_labels[partners])
    assert (partners != torch.arange(10_000)).float().mean() > 0.99  # nearly always another
    # each channel is an RTS distortion of its digit: the ink scales as for RTS, s^2 in
    # [0.49, 1.44] (mean 0.91), and the two channels' warps are independent
    for channel, source in ((0, plain), (1, plain[partners])):
        ink = images[:, channel].sum((1, 2)).double() / source.sum((1, 2, 3)).double()
        assert abs(ink.mean() - (1.2**3 - 0.7**3) / 3 / 0.5) < 0.02
        assert 0.47 < ink.quantile(0.005) and ink.quantile(0.995) < 1.46
    centre = torch.stack([moments(images[:, [c]])[0] for c in (0, 1)])  # (2, N, 2)
    assert abs(torch.corrcoef(centre[:, :, 0])[0, 1]) < 0.05
    assert (centre.std(1) > 3.5).all()
    # the same seed gives the same dataset (read back from its cache), another seed another
    again, again_labels = data.load("addition", "val", root=mnist_copy)
    assert torch.equal(again, images) and torch.equal(again_labels, labels)
    other, _ = data.load("addition", "val", root=mnist_copy, seed=1)
    assert not torch.equal(other, images)
    # fresh draws pair new partners each epoch, labels following
    fresh, fresh_labels = data.load("addition", "val", epoch=0, root=mnist_copy)
    assert fresh.shape == images.shape and not torch.equal(fresh_labels, labels)
    assert ((fresh_labels - plain_labels) >= 0).all() and ((fresh_labels - plain_labels) <= 9).all()


def test_concurrent_builders_do_not_corrupt_the_cache(mnist_copy):
    code = f"from stnbench import data; data.load('r', 'val', root={str(mnist_copy)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    path = data.cache_path("r", "val", root=mnist_copy)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    images, _ = data.load("r", "val", root=mnist_copy)
    expected = draw("r", data.load("plain", "val", root=mnist_copy)[0])[0]
    torch.testing.assert_close(images, (expected * 255).round() / 255, atol=0, rtol=0)


def test_damaged_cache_is_a_one_line_error(mnist_copy):
    data.load("p", "val", root=mnist_copy)
    path = data.cache_path("p", "val", root=mnist_copy)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(StnbenchError) as e:
        data.load("p", "val", root=mnist_copy)
    assert str(path) in str(e.value) and "delete it" in str(e.value) and "\n" not in str(e.value)


def test_fresh_draws_differ_per_epoch_and_never_touch_test(val):
    a, la = data.load("r", "val", epoch=0)
    b, _ = data.load("r", "val", epoch=1)
    assert a.shape == b.shape == val[0].shape and torch.equal(la, val[1])
    assert not torch.equal(a, b)
    with pytest.raises(StnbenchError, match="the test set stays fixed"):
        data.load("r", "test", epoch=0)


@pytest.mark.parametrize("name", ["r", "p", "e", "tc", "addition"])
def test_a_draw_renders_any_batch_as_the_whole_split_holds_it(mnist_root, name):
    """Training on fresh draws renders each batch's images when it needs them; they are the
    epoch's draw, value for value, whatever the batch (a random one here)."""
    whole, labels = data.load(name, "val", epoch=5)
    fresh = data.draw(name, "val", epoch=5)
    idx = torch.randperm(len(fresh), generator=torch.Generator().manual_seed(0))[:300]
    assert torch.equal(fresh.images(idx), whole[idx])
    assert torch.equal(fresh.labels[idx], labels[idx])
    assert not torch.equal(data.draw(name, "val", epoch=6).images(idx), whole[idx])
    with pytest.raises(StnbenchError, match="fresh draws are of distorted train or val splits"):
        data.draw("plain", "train")


def test_p_renders_no_nan_where_its_horizon_meets_a_pixel(mnist_root):
    """Digit 9288 of P's training draw for epoch 317 (seed 0, experiment=paper_fcn's data) has
    its homography's w exactly 0 at a pixel centre: that pixel is blank, not NaN, which ended
    a 150k-step run at step 61900."""
    assert torch.isfinite(data.draw("p", "train", epoch=317).images(slice(9288, 9289))).all()


def test_bad_names_and_values():
    names = ", ".join(sorted(data.recipes()))
    assert {"r", "rts", "p", "p_literal", "e", "tc"} <= set(data.recipes())
    with pytest.raises(StnbenchError, match=f"unknown dataset 'rst'; expected one of {names}"):
        data.load("rst", "train")
    with pytest.raises(
        StnbenchError, match="unknown split 'dev'; expected one of train, val, test"
    ):
        data.load("rts", "dev")
    with pytest.raises(StnbenchError, match="seed must be an integer >= 0; got 1.5"):
        data.load("rts", "val", seed=1.5)
    with pytest.raises(StnbenchError, match=r"data.recipe.scale must be \[lo, hi\]"):
        Recipe.from_dict({"scale": [1.2, 0.7]})
    with pytest.raises(
        StnbenchError, match="unknown key data.recipe.angle; expected one of canvas"
    ):
        Recipe.from_dict({"angle": 3})
    with pytest.raises(StnbenchError, match="recipe.tps_sigma must be 0 when corner_sigma is set"):
        Recipe(corner_sigma=1, tps_sigma=1)
    with pytest.raises(StnbenchError, match="recipe.clutter_size must be an integer in"):
        Recipe(clutter=1, clutter_size=40)
