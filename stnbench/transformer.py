"""The spatial transformer: a localisation net predicts parameters, stnbench.geometry warps.

Localisation nets follow the paper (Appendix A.4) and end in a regression layer that starts at
the identity transform: zero weights, and a bias that makes the output the identity's parameters.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stnbench import geometry
from stnbench.errors import StnbenchError

LOC_FCN_HIDDEN = 32  # ST-FCN: two 32-unit hidden layers, then the regression layer
LOC_CNN_FILTERS = 20  # ST-CNN: 2x downsample, conv 20 5x5, max-pool, conv 20 5x5, FC 20
LOC_CNN_HIDDEN = 20


class _HalfPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # avg_pool2d's sum, in its order, over 4
        return (
            x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]
        ) / 4

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # each input pixel gets a quarter of its output's
        b, c, h, w = g.shape
        return (g / 4)[:, :, :, None, :, None].expand(b, c, h, 2, w, 2).reshape(b, c, 2 * h, 2 * w)


class HalfPool(nn.Module):
    """2x2 average pooling, stride 2: nn.AvgPool2d(2)'s values and gradients bit for bit, faster
    on the CPU: its backward writes the gradient once, where avg_pool2d's fills zeros and then
    scatters (forward and backward of a 2xST-FCN's pooling, 256 x 2 x 42 x 42: 1.6 against 3.0 ms
    on 2 cores; whole training steps 1.01-1.12x, scripts/bench_pool.py). Odd sizes go to
    avg_pool2d."""

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
            return F.avg_pool2d(x, 2)
        return _HalfPool.apply(x)


def loc_fcn(input_size: int, channels: int = 1) -> nn.Sequential:
    """ST-FCN's localisation trunk: (B, C, S, S) -> (B, 32) features."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * input_size * input_size, LOC_FCN_HIDDEN),
        nn.ReLU(),
        nn.Linear(LOC_FCN_HIDDEN, LOC_FCN_HIDDEN),
        nn.ReLU(),
    )


def loc_cnn(input_size: int, channels: int = 1) -> nn.Sequential:
    """ST-CNN's localisation trunk: (B, C, S, S) -> (B, 20) features."""
    side = ((input_size // 2 - 4) // 2) - 4  # avg-pool 2, conv 5, max-pool 2, conv 5
    if side < 1:
        raise StnbenchError(
            f"input size {input_size} is too small for the ST-CNN localisation net; expected >= 28"
        )
    f = LOC_CNN_FILTERS
    return nn.Sequential(
        HalfPool(),  # the paper's 2x downsampling of the input
        nn.Conv2d(channels, f, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(f, f, 5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(f * side * side, LOC_CNN_HIDDEN),
        nn.ReLU(),
    )


def loc_coloc(input_size: int, channels: int = 1) -> nn.Sequential:
    """Co-localisation's localisation trunk (the paper's Appendix A.2): conv 8 9x9 stride 4,
    max-pool 2, FC 8, FC 8: (B, C, S, S) -> (B, 8) features."""
    side = ((input_size - 9) // 4 + 1) // 2
    if side < 1:
        raise StnbenchError(f"input size {input_size} is too small for co-localisation's net")
    return nn.Sequential(
        nn.Conv2d(channels, 8, 9, stride=4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * side * side, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.ReLU(),
    )


LOCALISATION = {
    "fcn": (loc_fcn, LOC_FCN_HIDDEN),
    "cnn": (loc_cnn, LOC_CNN_HIDDEN),
    "coloc": (loc_coloc, 8),
}


class SpatialTransformer(nn.Module):
    """Localisation net + grid + sampler: (B, C, S, S) -> (B, C, out, out) and params (B, P):
    the localisation net sees every channel, the warp moves them all alike.

    ``residual``: params = identity + delta, the regression layer predicting delta (starts at 0).
    ``tanh``: params = identity + tanh(delta), bounding each parameter's deviation from the
    identity to (-1, 1); it implies the residual form, since the identity's own parameters (+-1)
    lie on tanh's bounds. Otherwise the regression layer's bias is the identity itself.
    """

    def __init__(
        self,
        loc: str,
        kind: str,
        input_size: int,
        out_size: int | None = None,
        mode: str = "bilinear",
        residual: bool = False,
        tanh: bool = False,
        channels: int = 1,
    ):
        super().__init__()
        trunk, hidden = LOCALISATION[loc]
        self.kind, self.mode, self.tanh = kind, geometry.check_mode(mode), tanh
        self.residual = residual or tanh
        self.out_size = out_size or input_size
        self.loc = trunk(input_size, channels)
        self.regress = nn.Linear(hidden, geometry.num_params(kind))
        nn.init.zeros_(self.regress.weight)
        identity = geometry.identity(kind)
        self.register_buffer("identity", identity, persistent=False)
        with torch.no_grad():
            self.regress.bias.copy_(torch.zeros_like(identity) if self.residual else identity)

    def params(self, x: Tensor) -> Tensor:
        """Predicted transform parameters (B, P)."""
        out = self.regress(self.loc(x))
        if self.tanh:
            out = torch.tanh(out)
        return self.identity + out if self.residual else out

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.params(x)  # (B, P)
        g = geometry.grid(self.kind, p, (self.out_size, self.out_size))  # (B, out, out, 2)
        return geometry.sample(x, g, self.mode), p


DEAD_SPREAD = 1e-5  # a transformer whose every parameter varies less than this is dead
BLANK_INK = 0.1  # a transformer whose outputs hold less than this share of the input's mean ink
# samples blank space (it flew off, or zoomed out to a dot): a collapse, whatever the budget


def ink_share(images: Tensor) -> Tensor:
    """The share of each two-channel image's ink (N, 2, H, W) that lies in channel 0, (N,). On
    MNIST addition, where channel 0 holds the first digit and channel 1 its partner, a
    transformer that attends to the first digit keeps most of channel 0's ink (share > 0.5 for
    that image); ``(ink_share(out) > 0.5).mean()`` over the test set is its mostly_channel0
    (1 for outputs that show the first digit alone, about 0.5 for the input itself)."""
    ink = images.flatten(2).sum(2)  # (N, 2)
    return ink[:, 0] / ink.sum(1).clamp_min(1e-8)


@torch.no_grad()
def ink(t: "SpatialTransformer", x: Tensor) -> float:
    """The mean intensity of the transformer's outputs for inputs x over that of x (~1 near the
    identity, more when it zooms in, ~0 when it samples blank space)."""
    return (t(x)[0].mean() / x.mean().clamp_min(1e-12)).item()


@torch.no_grad()
def liveness(t: SpatialTransformer, x: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """The parameters predicted for inputs x, (N, P), and for each hidden unit of the
    localisation net (a convolution's channel, a fully connected layer's feature, in layer
    order) whether it fired (> 0 after its ReLU) for any input, (U,) bool.

    A dead transformer predicts one transform for every input: the spread of its parameters over
    x is ~0 (below DEAD_SPREAD), typically because its last hidden units all stopped firing,
    leaving the regression layer's bias.
    """
    fired = {}

    def hook(module, inputs, out):
        on = (out > 0).flatten(2).any(2) if out.ndim > 2 else out > 0  # (B, units)
        fired[module] = on.any(0) | fired.get(module, False)

    relus = [m for m in t.loc.modules() if isinstance(m, nn.ReLU)]
    handles = [m.register_forward_hook(hook) for m in relus]
    try:
        params = torch.cat([t.params(x[i : i + batch]) for i in range(0, len(x), batch)])
    finally:
        for h in handles:
            h.remove()
    return params, torch.cat([fired[m] for m in relus])
