"""TensorBoard diagnostics of a spatial transformer, written into the run's own folder.

Tags are named so that TensorBoard opens on what a researcher looks at first: its Time Series
dashboard sorts groups (a tag's prefix) by name and expands the first two, so the error curves
are ``error/train``, ``error/val`` (and ``error/val_untransformed``), then ``loss/...``. The
final results are ``result/...`` at the last step, for the HPARAMS dashboard to read. Runs
written before 2026-12-07 used ``train/``, ``val/``, ``hparam/`` (step 0) and
``inputs_and_outputs`` (stnbench.legacy); the readers take both (``VAL_ERROR``, ``PANELS``)."""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from stnbench import geometry, legacy

OUTLINE = 4  # the outline is traced at 4x the output's resolution, so it draws as a line
PANEL = "inputs_top_outputs_bottom"  # the image a transformer's diagnostics log, under transform/
PANELS = (PANEL, legacy.PANEL)  # its tag, newest first
VAL_ERROR = ("error/val", legacy.VAL_ERROR)  # the validation error's tag, newest first


def val_tags(metric: str) -> tuple[str, ...]:
    """The tags a task's validation metric was logged under, newest first."""
    return VAL_ERROR if metric == "error" else (f"{metric}/val",)


def rgb(images: Tensor) -> Tensor:
    """Images (B, C, H, W) as RGB: one channel as grey, two as green and blue (addition's two
    digits; red is kept for the outline), three as they are (RGB already: a drawn outline)."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] == 3:
        return images
    return torch.cat([torch.zeros_like(images[:, :1]), images[:, :2]], dim=1)


def outline(
    images: Tensor, kind: str, params: Tensor, out_size: int, color=(1.0, 0.0, 0.0)
) -> Tensor:
    """Inputs (B, C, H, W) as RGB (B, 3, H, W) (tblog.rgb) with the sampling grid's outline
    drawn in ``color`` (red)."""
    b, _, h, w = images.shape
    n = OUTLINE * out_size
    g = geometry.grid(kind, params, (n, n))  # (B, n, n, 2)
    edge = torch.cat([g[:, 0], g[:, -1], g[:, :, 0], g[:, :, -1]], dim=1)  # (B, 4n, 2)
    x = ((edge[..., 0] + 1) * w - 1) / 2  # normalised -> pixel index (align_corners=False)
    y = ((edge[..., 1] + 1) * h - 1) / 2
    ix, iy = x.round().long(), y.round().long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    which = torch.arange(b, device=images.device)[:, None].expand_as(ix)
    drawn = rgb(images).clone()
    drawn[which[inside], :, iy[inside], ix[inside]] = drawn.new_tensor(color)
    return drawn


def transform_panel(images: Tensor, out: Tensor, kind: str, params: Tensor) -> Tensor:
    """One image (3, H', W'): the B inputs in a row, each with its grid's outline, above the
    transformer's B outputs (``PANEL``)."""
    size = images.shape[-1]
    drawn = outline(images, kind, params, out.shape[-1])
    shown = F.interpolate(out, size=(size, size), mode="nearest") if out.shape[-1] != size else out
    rows = torch.cat([drawn, rgb(shown)])  # (2B, 3, H, W): inputs, then their outputs
    # imported here: torchvision's import takes 1.4 s (it loads torch._dynamo), which runs
    # without a transformer need not pay
    from torchvision.utils import make_grid

    return make_grid(rows.clamp(0, 1).cpu(), nrow=len(images), padding=2, pad_value=0.5)


def write_hparams(writer: SummaryWriter, hparam: dict, metrics: dict, step: int) -> None:
    """Hparams and their final metrics (``result/<name>`` at the last step) into the writer's
    own run (add_hparams makes a sub-run)."""
    scalars = {f"result/{k}": v for k, v in metrics.items()}
    for summary in hparams(hparam, scalars):
        writer.file_writer.add_summary(summary)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
