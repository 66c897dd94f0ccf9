"""The paper's classifiers (FCN, CNN) and their spatial transformer versions, parameter-matched.

docs/models.md describes the architectures (Appendix A.4: three weight layers each, ReLUs), the
transformer options and where the paper does not fit (an unpadded CNN cannot take RTS's 21x21
after pooling: both convolutions are then padded to keep their size).

Widths are computed, not configured: for each model and input size the classifier's width is
the integer whose total learnable parameter count (localisation net included) comes nearest the
budget (default 400k), so all models for one canvas have about the same size.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stnbench import geometry
from stnbench.errors import StnbenchError
from stnbench.geometry import KINDS
from stnbench.transformer import HalfPool, SpatialTransformer

BUDGET = 400_000
MAX_WIDTH = 4096


def fcn(input_size: int, width: int, num_classes: int, channels: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * input_size * input_size, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


def cnn_padding(input_size: int) -> tuple[int, int]:
    """Padding of the two convolutions: none where the paper's stack fits, else 'same'."""
    return (0, 0) if ((input_size - 8) // 2 - 6) // 2 >= 1 else (4, 3)


def cnn(
    input_size: int, width: int, num_classes: int, channels: int = 1, multi: str | None = None
) -> nn.Sequential:
    """The CNN; ``multi`` (a transform kind) also warps its feature maps before the second
    convolution by a transformer of that kind (the paper's ST-CNN Multi)."""
    p1, p2 = cnn_padding(input_size)
    first = (input_size - 8 + 2 * p1) // 2
    side = (first - 6 + 2 * p2) // 2
    warp = [] if multi is None else [FeatureWarp(multi, first, width)]  # no module: the indices
    return nn.Sequential(  # of the CNN's layers stay, and so its checkpoints
        FirstConv2d(channels, width, 9, padding=p1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        *warp,
        nn.Conv2d(width, width, 7, padding=p2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * side * side, num_classes),
    )


class _InputGradByMatmul(torch.autograd.Function):
    """conv2d whose gradient for its input is one matmul and a col2im (F.fold), not oneDNN's
    backward-data kernel, which is slow for the few input channels of a first layer: for the
    CNN's 1 -> 88 9x9 convolution on 28x28, a batch of 64 on 2 cores, the layer's backward took
    29 ms with oneDNN's input gradient against 2.4 + 4.2 ms for the weights' and this one, most
    of the gap between ST-CNN and CNN there (docs/performance.md). Stride 1, no dilation."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, ctx.padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        b, c, h, w_out = g.shape
        cols = w.reshape(c, -1).t() @ g.reshape(b, c, h * w_out)  # (B, C_in k k, h w)
        gx = F.fold(cols, x.shape[-2:], w.shape[-2:], padding=ctx.padding)
        bias, p = [c] if ctx.has_bias else None, [ctx.padding] * 2
        _, gw, gb = torch.ops.aten.convolution_backward(  # oneDNN's own, for weights and bias
            g, x, w, bias, [1, 1], p, [1, 1], False, [0, 0], 1, [False, True, ctx.has_bias]
        )  # fmt: skip
        return gx, gw, gb, None


class FirstConv2d(nn.Conv2d):
    """The classifier's first convolution: nn.Conv2d (same parameters, same checkpoints) whose
    input gradient, needed only behind a transformer, is computed by _InputGradByMatmul."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:  # a plain CNN's input: oneDNN's own backward (weights only)
            return super().forward(x)
        return _InputGradByMatmul.apply(x, self.weight, self.bias, self.padding[0])


class FeatureWarp(nn.Module):
    """A spatial transformer inside the network: it warps feature maps (B, C, S, S), its
    localisation net two fully connected layers of 32 (the paper's for SVHN's deeper ones)."""

    def __init__(self, kind: str, size: int, channels: int):
        super().__init__()
        self.transformer = SpatialTransformer("fcn", kind, size, channels=channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.transformer(x)[0]


@dataclass(frozen=True)
class Arch:
    """A registered model: its classifier, and its localisation net (None: no transformer)."""

    classifier: Callable[..., nn.Module]  # (input side, width, classes, channels) -> module
    loc: str | None  # a key of stnbench.transformer.LOCALISATION
    label: str  # in table rows


MODELS = {
    "fcn": Arch(fcn, None, "FCN"),
    "cnn": Arch(cnn, None, "CNN"),
    "st_fcn": Arch(fcn, "fcn", "ST-FCN"),
    "st_cnn": Arch(cnn, "cnn", "ST-CNN"),
}
# options of the transformers (how many side by side, and each one's)
ST_OPTIONS = ("transformers", "multi", "out_size", "pool", "mode", "residual", "tanh")


def is_st(model: str) -> bool:
    """Whether a registered model has a spatial transformer."""
    return MODELS[model].loc is not None


class STModel(nn.Module):
    """Spatial transformers side by side (each sees and warps every channel; their outputs are
    concatenated along channels) -> optional 2x average pooling -> classifier."""

    def __init__(self, transformers: list[SpatialTransformer], pool: bool, classifier: nn.Module):
        super().__init__()
        first, *others = transformers
        self.transformer = first  # its own name: a one-transformer model's checkpoints load
        self.others = nn.ModuleList(others)
        self.pool = HalfPool() if pool else nn.Identity()
        self.classifier = classifier

    @property
    def transformers(self) -> list[SpatialTransformer]:
        return [self.transformer, *self.others]

    @property
    def feature_warps(self) -> list[SpatialTransformer]:
        """The transformers inside the classifier: model.multi's, on the CNN's feature maps."""
        return [m.transformer for m in self.classifier.modules() if isinstance(m, FeatureWarp)]

    @torch.no_grad()
    def feature_inputs(self, x: Tensor) -> list[tuple[SpatialTransformer, Tensor]]:
        """Each feature-map transformer with the feature maps that reach it for inputs x."""
        warps, seen = self.feature_warps, {}

        def keep(t, inputs) -> None:  # returns None: the input goes on unchanged
            seen.setdefault(t, inputs[0])

        hooks = [t.register_forward_pre_hook(keep) for t in warps]
        try:
            if warps:
                self(x)
        finally:
            for h in hooks:
                h.remove()
        return [(t, seen[t]) for t in warps]

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The transformers' outputs (B, N C, out, out), before pooling, and params (B, N P)."""
        outs, params = zip(*(t(x) for t in self.transformers), strict=True)
        return torch.cat(outs, dim=1), torch.cat(params, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        # pooling each output before the concatenation (the same values) copies a quarter as much
        outs = [self.pool(t(x)[0]) for t in self.transformers]  # N x (B, C, out/2, out/2)
        return self.classifier(torch.cat(outs, dim=1))  # (B, num_classes)

    def untransformed(self, x: Tensor) -> Tensor:
        """Logits with every transformer bypassed by the identity, those on the feature maps
        (model.multi) too (the seed notes' "CNN only")."""
        t = self.transformer
        if t.out_size != x.shape[-1]:  # the identity to another size: a plain resampling
            x = geometry.warp(x, t.kind, t.identity.expand(len(x), -1), (t.out_size,) * 2, t.mode)
        x = self.pool(x.repeat(1, len(self.transformers), 1, 1))
        for layer in self.classifier:  # the classifier's layers in order, feature warps skipped
            x = x if isinstance(layer, FeatureWarp) else layer(x)
        return x


def count(module: nn.Module) -> int:
    """Learnable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _width(make, budget: int, fixed: int) -> int:
    """The classifier width whose total parameter count comes nearest ``budget``."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost

        def total(w):
            return fixed + count(make(w))

        lo, hi = 1, MAX_WIDTH  # total() grows with the width: bisect for the crossing
        if total(lo) > budget:
            raise StnbenchError(
                f"budget {budget} is below the smallest such model ({total(lo)} parameters)"
            )
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
        return min((lo, hi), key=lambda w: abs(total(w) - budget))


def build(
    model: str,
    transform: str | None,
    input_size: int,
    num_classes: int = 10,
    channels: int = 1,
    **options,
) -> nn.Module:
    """A classifier for (B, channels, input_size, input_size) images -> logits (B, num_classes).

    ``model`` is a key of MODELS; ``transform`` the ST models' kind (a key of geometry.KINDS;
    ignored by fcn and cnn). ``options`` are conf/model's: ``budget`` (learnable parameters to
    match, default 400k); for ST models ``transformers`` (how many side by side), ``multi``
    (ST-CNN: a transformer of the same kind on the feature maps too), ``out_size`` (default the
    input's), ``pool`` (2x average pooling after the transformers; default on for inputs of 42
    and more, as the paper does for RTS and TC), and ``mode``, ``residual``, ``tanh``
    (SpatialTransformer's).
    """
    if model not in MODELS:
        raise StnbenchError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    arch, budget = MODELS[model], options.pop("budget", None) or BUDGET
    make = arch.classifier
    if arch.loc is None:
        width = _width(lambda w: make(input_size, w, num_classes, channels), budget, 0)
        return make(input_size, width, num_classes, channels)

    if transform is None:
        raise StnbenchError(f"model {model} needs a transform; expected one of {', '.join(KINDS)}")
    pool, n = options.pop("pool", None), options.pop("transformers", 1)
    pool = input_size >= 42 if pool is None else bool(pool)
    if options.pop("multi", False):  # ST-CNN Multi: a transformer on the feature maps too
        if make is not cnn:
            raise StnbenchError(f"model.multi needs a convolutional model (st_cnn); got {model}")
        make = functools.partial(cnn, multi=transform)
    transformers = [
        SpatialTransformer(arch.loc, transform, input_size, channels=channels, **options)
        for _ in range(n)
    ]
    seen = transformers[0].out_size // 2 if pool else transformers[0].out_size
    fixed, seen_channels = sum(map(count, transformers)), n * channels
    width = _width(lambda w: make(seen, w, num_classes, seen_channels), budget, fixed)
    return STModel(transformers, pool, make(seen, width, num_classes, seen_channels))


def from_config(
    model: dict, transform: dict | None, input_size: int, num_classes: int = 10, channels: int = 1
):
    """build() from the ``model`` and ``transform`` config groups (conf/model, conf/transform)."""
    options = {k: v for k, v in model.items() if k != "name"}  # fcn and cnn take only the budget
    kind = transform["kind"] if transform else None
    return build(model["name"], kind, input_size, num_classes, channels, **options)


def prepare(model: nn.Module, dev) -> nn.Module:
    """A model as the training loop runs it: on the device, its convolutions in channels_last
    memory (+14% ST-CNN on RTS, +22% CNN on 28x28 training throughput on the 2-core CPU;
    measured with scripts/bench_train.py)."""
    return model.to(dev, memory_format=torch.channels_last)
