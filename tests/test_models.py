import importlib.resources

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from stnbench import geometry
from stnbench.cli import load_config
from stnbench.errors import StnbenchError, describe
from stnbench.models import (
    BUDGET,
    MODELS,
    FeatureWarp,
    FirstConv2d,
    STModel,
    build,
    cnn_padding,
    count,
    from_config,
    is_st,
)
from stnbench.transformer import HalfPool

CANVASES = (28, 42, 60)
COMBOS = [(m, k) for m in MODELS for k in (geometry.KINDS if is_st(m) else [None])]


def batch(size, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.mark.parametrize("size", CANVASES)
@pytest.mark.parametrize(("model", "kind"), COMBOS)
def test_every_model_trains_and_st_models_start_at_identity(model, kind, size):
    torch.manual_seed(0)
    net = build(model, kind, size)
    x, y = batch(size)
    logits = net(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()

    if isinstance(net, STModel):  # starts at the identity, returning its input unchanged
        out, params = net.transform(x)
        torch.testing.assert_close(params, geometry.identity(kind).expand(4, -1))
        torch.testing.assert_close(out, x, atol=1e-5, rtol=0)

    assert_every_parameter_learns(net, x, y)


def assert_every_parameter_learns(net, x, y):
    """Every parameter receives a gradient: after one step (the zero-initialised regression
    layer blocks the localisation net's gradient until it moves), all of them are non-zero."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} received no gradient"


@pytest.mark.parametrize("size", CANVASES)
def test_all_models_of_a_canvas_match_the_budget(size):
    counts = {(m, k): count(build(m, k, size)) for m, k in COMBOS}
    for key, n in counts.items():
        assert abs(n / BUDGET - 1) < 0.05, (key, n)
    assert max(counts.values()) / min(counts.values()) < 1.05
    assert count(build("cnn", None, size, budget=200_000)) == pytest.approx(200_000, rel=0.05)


@pytest.mark.parametrize(("model", "kind"), [(m, "affine" if is_st(m) else None) for m in MODELS])
def test_models_take_the_datas_channels_and_classes_within_the_budget(model, kind):
    """Addition: two digits in two channels of 42x42, 19 sums; the warp moves both channels."""
    torch.manual_seed(0)
    net = build(model, kind, 42, num_classes=19, channels=2)
    assert abs(count(net) / BUDGET - 1) < 0.05
    x = torch.rand(4, 2, 42, 42, generator=torch.Generator().manual_seed(0))
    assert net(x).shape == (4, 19)
    if isinstance(net, STModel):
        torch.testing.assert_close(net.transform(x)[0], x, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError):  # one channel is not what it was built for
        net(x[:, :1])


@pytest.mark.parametrize("model", ["st_fcn", "st_cnn"])
def test_transformers_side_by_side_start_at_identity_and_all_learn(model):
    torch.manual_seed(0)
    net = build(model, "affine", 42, num_classes=19, channels=2, transformers=2)
    assert abs(count(net) / BUDGET - 1) < 0.05 and len(net.transformers) == 2
    x = torch.rand(4, 2, 42, 42, generator=torch.Generator().manual_seed(0))
    out, params = net.transform(x)  # each warps both channels; outputs stacked along channels
    torch.testing.assert_close(out, torch.cat([x, x], dim=1), atol=1e-5, rtol=0)
    assert params.shape == (4, 12) and net(x).shape == (4, 19)
    torch.testing.assert_close(net.untransformed(x), net(x), atol=1e-5, rtol=1e-4)
    assert_every_parameter_learns(net, x, torch.randint(0, 19, (4,)))
    # one transformer keeps its parameter names: checkpoints written before still load
    one = build(model, "affine", 28).state_dict()
    assert any(k.startswith("transformer.loc.") for k in one)
    assert not any(k.startswith("others.") for k in one)


def test_the_cnns_parameter_names_are_those_its_checkpoints_hold():
    names = {"0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias"}
    assert set(build("cnn", None, 28).state_dict()) == names
    st = build("st_cnn", "affine", 42).state_dict()
    assert {k.removeprefix("classifier.") for k in st if k.startswith("classifier.")} == names


@pytest.mark.parametrize("size", CANVASES)
def test_st_cnn_multi_warps_feature_maps_from_the_identity_and_all_learn(size):
    torch.manual_seed(0)
    net = build("st_cnn", "affine", size, multi=True)
    assert abs(count(net) / BUDGET - 1) < 0.05
    (warp,) = [m for m in net.classifier if isinstance(m, FeatureWarp)]
    maps = torch.rand(4, warp.transformer.loc[1].in_features // warp.transformer.out_size**2,
                      warp.transformer.out_size, warp.transformer.out_size)  # fmt: skip
    torch.testing.assert_close(warp(maps), maps, atol=1e-5, rtol=0)  # starts at the identity
    assert_every_parameter_learns(net, *batch(size))
    with pytest.raises(StnbenchError, match="model.multi needs a convolutional model"):
        build("st_fcn", "affine", size, multi=True)


def test_the_feature_map_transformer_is_diagnosed_bypassed_and_measured(tmp_path):
    """model.multi's transformer counts as the input's does: flown off its feature maps by hand
    (a shift of 5 half-widths), it leaves the run's ink blank and its transformer dead, the
    range test's distance is its, and the untransformed logits skip it."""
    from torch.utils.tensorboard import SummaryWriter

    from stnbench import diagnostics, lr_find

    torch.manual_seed(0)
    net, x = build("st_cnn", "affine", 28, multi=True).eval(), batch(28)[0]
    (warp,) = net.feature_warps
    plain = net.untransformed(x)
    with torch.no_grad():
        warp.regress.bias.copy_(torch.tensor([1.0, 0.0, 5.0, 0.0, 1.0, 0.0]))
    assert torch.equal(net.untransformed(x), plain) and not torch.allclose(net(x), plain)
    ((t, maps),) = net.feature_inputs(x)
    with torch.no_grad():  # what reaches it: the first convolution's pooled maps
        assert t is warp and torch.equal(maps, net.classifier[:3](net.pool(net.transform(x)[0])))
    with SummaryWriter(tmp_path) as writer:
        spread, _, share, line = diagnostics.transformers(net, x, 4, writer, 0)
    # the input transformer keeps its ink (about 1): the blank is the feature warp's
    assert share < 0.1 and diagnostics.dead(1.0, share) and "ink 0.00" in line
    assert lr_find.grid_distance(net.transformer, x) == 0.0 and lr_find.farthest(net, x) > 4


@pytest.mark.parametrize(("channels", "padding"), [(1, 0), (2, 0), (1, 4)])
def test_first_conv_matches_torchs_convolution_and_its_gradients(channels, padding):
    """The classifier's first convolution computes its input gradient its own way (matmul +
    fold); output and every gradient must be nn.Conv2d's, in float32 (up to summation order)
    and in float64 (gradcheck), with and without the input needing a gradient."""
    torch.manual_seed(0)
    ours = FirstConv2d(channels, 8, 9, padding=padding)
    torch_conv = torch.nn.Conv2d(channels, 8, 9, padding=padding)
    torch_conv.load_state_dict(ours.state_dict())
    x = torch.rand(5, channels, 21, 21).contiguous(memory_format=torch.channels_last)
    grads = []
    for conv in (ours, torch_conv):
        xg = x.clone().requires_grad_(True)
        out = conv(xg)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out, xg.grad, conv.weight.grad, conv.bias.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ours.weight.grad = None
    ours(x).sum().backward()  # a plain CNN's input: torch's own path, the weights still learn
    assert ours.weight.grad is not None and ours.weight.grad.abs().sum() > 0
    d = ours.double()
    xd = torch.rand(2, channels, 12, 12, dtype=torch.float64, requires_grad=True)
    wd, bd = (p.detach().clone().requires_grad_(True) for p in (d.weight, d.bias))
    conv = lambda x, w, b: functional_call(d, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(conv, (xd, wd, bd))


def test_cnn_pads_only_where_the_paper_stack_cannot_fit():
    assert cnn_padding(28) == (0, 0) and cnn_padding(30) == (0, 0) and cnn_padding(42) == (0, 0)
    assert cnn_padding(21) == (4, 3)  # RTS after the transformer's 2x pooling
    net = build("st_cnn", "affine", 42)  # pools 42 -> 21 by default
    assert isinstance(net.pool, HalfPool) and net(batch(42)[0]).shape == (4, 10)


@pytest.mark.parametrize("shape", [(256, 2, 42, 42), (3, 20, 28, 28), (2, 1, 60, 60), (2, 1, 7, 9)])
def test_half_pool_is_avg_pool2d_bit_for_bit(shape):
    """The pooling after the transformers (and in ST-CNN's localisation net): torch's own
    avg_pool2d's values and input gradients, exactly; odd sizes go to avg_pool2d itself."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = HalfPool()(a), torch.nn.functional.avg_pool2d(b, 2)
    g = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1))
    ours.backward(g), theirs.backward(g)
    assert torch.equal(ours, theirs) and torch.equal(a.grad, b.grad)


def test_transformer_options():
    x, _ = batch(60)
    net = build("st_cnn", "attention", 60, out_size=30, pool=False)
    out, params = net.transform(x)
    assert out.shape == (4, 1, 30, 30) and params.shape == (4, 3)
    assert isinstance(net.pool, torch.nn.Identity) and net(x).shape == (4, 10)
    # a 60 -> 30 identity transform is a 2x downsampling: the mean of each 2x2 block
    torch.testing.assert_close(out, torch.nn.functional.avg_pool2d(x, 2), atol=1e-5, rtol=0)
    for opts in ({"residual": True}, {"tanh": True}, {"mode": "nearest"}):
        net = build("st_fcn", "tps", 28, **opts)
        out, params = net.transform(batch(28)[0])
        torch.testing.assert_close(params, geometry.identity("tps").expand(4, -1))
        torch.testing.assert_close(out, batch(28)[0], atol=1e-5, rtol=0)
    tanh = build("st_fcn", "affine", 28, tanh=True).transformer
    with torch.no_grad():
        tanh.regress.bias.fill_(100.0)  # far out: the deviation saturates at 1
    assert (tanh.params(batch(28)[0]) - geometry.identity("affine")).max() <= 1.0


@pytest.mark.parametrize(("model", "kind"), COMBOS)
def test_config_groups_build_their_models(model, kind):
    cfg = load_config("stnbench_train", [f"model={model}", f"transform={kind or 'affine'}"])
    c = OmegaConf.to_container
    net = from_config(c(cfg.model), c(cfg.transform), 42)
    assert abs(count(net) / cfg.model.budget - 1) < 0.05
    assert isinstance(net, STModel) == is_st(model)
    if is_st(model):
        assert net.transformer.kind == kind


def test_every_registered_model_and_kind_has_a_config():
    conf = importlib.resources.files("stnbench.conf")
    for group, names in (("model", MODELS), ("transform", geometry.KINDS)):
        assert sorted(f.name[:-5] for f in (conf / group).iterdir()) == sorted(names)


def test_bad_names_and_options():
    with pytest.raises(
        StnbenchError, match="unknown model 'resnet'; expected one of fcn, cnn, st_fcn, st_cnn"
    ):
        build("resnet", None, 28)
    with pytest.raises(
        StnbenchError, match="unknown transform kind 'shear'; expected one of affine"
    ):
        build("st_cnn", "shear", 28)
    with pytest.raises(StnbenchError, match="model st_fcn needs a transform"):
        build("st_fcn", None, 28)
    with pytest.raises(StnbenchError, match="unknown sampling mode 'bicubic'"):
        build("st_cnn", "affine", 28, mode="bicubic")
    with pytest.raises(StnbenchError, match="too small for the ST-CNN localisation net"):
        build("st_cnn", "affine", 20)
    with pytest.raises(StnbenchError, match="budget 1000 is below the smallest such model"):
        build("st_fcn", "affine", 60, budget=1000)
    # the config refuses what build() would not know: unknown options, wrong types
    with pytest.raises(Exception) as e:
        load_config("stnbench_train", ["model=cnn", "model.dropout=0.5"])
    assert describe(e.value).startswith("unknown key model.dropout; expected one of name, budget")
    with pytest.raises(StnbenchError, match="model.tanh must be left unset: model=cnn has no"):
        load_config("stnbench_train", ["model=cnn", "model.tanh=true"])


@pytest.mark.parametrize("loc", ["fcn", "cnn"])
def test_liveness_tells_a_dead_transformer_from_a_working_one(loc):
    from stnbench.transformer import DEAD_SPREAD, SpatialTransformer, liveness

    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28)
    working = SpatialTransformer(loc, "affine", 28)
    torch.nn.init.normal_(working.regress.weight, std=0.1)  # as after some training
    params, fired = liveness(working, x, batch=16)
    assert params.shape == (64, 6) and params.std(0).max() > DEAD_SPREAD
    last = working.regress.in_features  # the units the regression layer reads
    assert fired[-last:].any()

    dead = SpatialTransformer(loc, "affine", 28)
    dead.load_state_dict(working.state_dict())
    with torch.no_grad():  # the last hidden layer's units never fire: only the bias is left
        [*_, last_linear, _] = dead.loc
        last_linear.bias.fill_(-1e3)
    params, fired = liveness(dead, x, batch=16)
    assert params.std(0).max() < DEAD_SPREAD
    torch.testing.assert_close(params, dead.regress.bias.expand(64, -1))
    assert not fired[-last:].any() and fired[:-last].any()
    assert 1 - fired.float().mean() >= last / len(fired)


def test_the_attention_measure_is_1_for_one_digit_alone_and_one_half_on_the_input(mnist_root):
    """mostly_channel0 (stnbench-analyse attention), per image: outputs built by hand to show
    the first digit alone score 1, the second digit alone 0, the addition input itself 0.5
    (the two digits' ink is as often more in one channel as in the other)."""
    from stnbench.data import load
    from stnbench.transformer import ink_share

    x, _ = load("addition", "test")  # (N, 2, 42, 42): first digit, partner
    first, second = x.clone(), x.clone()
    first[:, 1], second[:, 0] = 0, 0
    assert (ink_share(first) > 0.5).float().mean().item() == 1.0
    assert (ink_share(second) > 0.5).float().mean().item() == 0.0
    assert (ink_share(x) > 0.5).float().mean().item() == pytest.approx(0.5, abs=0.02)
    # both digits zoomed, the first larger: per image it is the first, whatever the mean says
    both = first * 0.7 + second * 0.3
    assert (ink_share(both) > 0.5).float().mean().item() > 0.9
