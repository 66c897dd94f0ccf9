"""One training run: ``train(cfg, out) -> metrics``, everything it writes under ``out``.

The loop keeps the data on the device and picks each batch by index; the batch of step s is a
pure function of (seed, epoch, position) and the learning rate a pure function of s, so a
checkpoint (model, optimiser, ``State``) is all a resume needs to continue exactly. The helpers
below are functions the loop calls.

Writes, through stnbench.rundir (the folder's lock, its binding to the config, the JSON and
checkpoint files): ``metrics.json`` (atomically, last), ``checkpoint.pt`` (at every validation);
and TensorBoard event files. What is learned and scored is the task's (stnbench.tasks). The
tables use ``test_error``, the final model's, as the paper reports; the best-validation model's
is ``best_test_error``.
"""

import datetime
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stnbench import allocator, data, device, errors, geometry, models, rundir, tasks, tblog
from stnbench.config import recipe_of
from stnbench.errors import Interrupted
from stnbench.optim import lr_factor, make_optimizer, set_lr
from stnbench.rundir import claimed, finished, twin
from stnbench.tasks import classify
from stnbench.transformer import BLANK_INK, DEAD_SPREAD, ink, liveness

log = logging.getLogger(__name__)
HPARAMS = ("data", "model", "optim", "lr", "loc_lr_mult", "schedule", "batch_size", "train_size")


@dataclass
class State:
    """Where a run stands; checkpointed with the model and the optimiser."""

    step: int = 0
    status: str = "ok"  # ok, diverged or collapsed
    reason: str = ""
    best_val_error: float = math.inf
    best_step: int = 0
    best_model: dict | None = None  # the best-validation model's state_dict
    streak: int = 0  # validations in a row at or above train.collapse.error
    collapsed_at: int | None = None
    seconds: float = 0.0  # wall time of the loop, validation included
    eval_seconds: float = 0.0
    last_val: list | None = None  # [step, loss, error] of the latest validation
    transform_spread: float | None = None  # ST models, latest validation: see transformer.liveness
    loc_dead_units: float | None = None  # share of the localisation net's units that never fired
    transform_ink: float | None = None  # ST models, latest validation: see transformer.ink


# A run's data on the device: split -> (images (N, C, S, S), labels (N,)), for train (redrawn
# each epoch when data.fresh), val and test
Splits = dict[str, tuple[Tensor, Tensor]]


# --- data, model, checkpoints -------------------------------------------------------------------


def load_splits(cfg: DictConfig, dev: torch.device) -> Splits:
    """The run's val and test splits, and its fixed training set unless data.fresh (batches
    draws those)."""
    rec, c = recipe_of(cfg), cfg.data

    def split(name: str, limit: int | None):
        x, y = data.load(c.name, name, c.root, c.seed, dev, rec)
        return x[:limit].to(dev), y[:limit].to(dev)

    sizes = {"val": cfg.train.val_size, "test": None}
    if not c.fresh:
        sizes["train"] = c.train_size or data.TRAIN_SIZE
    return {name: split(name, limit) for name, limit in sizes.items()}


def batches(cfg: DictConfig, d: Splits, start: int):
    """The batches (x (B, C, S, S), y (B,)) of steps start, start + 1, ...: step s's batch is a
    pure function of (seed, epoch, position), and of the epoch's fresh draw when data.fresh,
    whose images are rendered a batch at a time (stnbench.distortions.Draw)."""
    b, c, dev = cfg.train.batch_size, cfg.data, d["val"][0].device
    n = min(c.train_size or data.TRAIN_SIZE, data.TRAIN_SIZE)
    per_epoch, step = n // b, start
    while True:
        epoch = step // per_epoch
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            cfg.seed * 1_000_003 + epoch)).to(dev)  # fmt: skip
        if c.fresh:  # a fresh draw's labels too: addition draws new partners each epoch
            fresh = data.draw(c.name, "train", c.root, c.seed, recipe_of(cfg), epoch)
        for j in range(step % per_epoch, per_epoch):
            idx = order[j * b : (j + 1) * b]
            if c.fresh:  # the draw's values live on the CPU
                on_cpu = idx.cpu()
                yield fresh.images(on_cpu, dev), fresh.labels[on_cpu].to(dev)
            else:
                yield d["train"][0][idx], d["train"][1][idx]
        step = (epoch + 1) * per_epoch


def build_model(cfg: DictConfig, dev: torch.device) -> nn.Module:
    """The run's model, initialised from its seed, as the loop runs it: on the device, its
    convolutions in channels_last memory (+14% ST-CNN on RTS, +22% CNN on 28x28 training
    throughput on the 2-core CPU; measured with scripts/bench_train.py)."""
    torch.manual_seed(cfg.seed)
    c = OmegaConf.to_container
    channels, canvas, classes = data.shape(recipe_of(cfg))
    net = models.from_config(c(cfg.model), c(cfg.transform), canvas, classes, channels)
    return prepare(net, dev)


def prepare(model: nn.Module, dev: torch.device) -> nn.Module:
    """A model as the loop runs it (build_model's last step), for the benchmarks."""
    return model.to(dev, memory_format=torch.channels_last)


def trained_model(folder: Path, dev: str = "cpu"):
    """A run's config and its model in eval mode with the weights that validation and test saw
    (the moving average, when train.ema kept one), and the step of its checkpoint."""
    cfg = OmegaConf.load(Path(folder) / ".hydra" / "config.yaml")
    ckpt = rundir.load_checkpoint(Path(folder) / "checkpoint.pt", torch.device(dev))
    model = build_model(cfg, torch.device(dev))
    weights = ckpt["model"]
    if "ema" in ckpt:  # an AveragedModel's: its module's, and how many it averaged
        weights = {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"
        }
    model.load_state_dict(weights)
    return cfg, model.eval(), ckpt["state"]["step"]


def save_checkpoint(r: "Run") -> None:
    blob = {"config": OmegaConf.to_container(r.cfg), "model": r.model.state_dict(),
            "optimizer": r.opt.state_dict(), "state": vars(r.state)}  # fmt: skip
    if r.ema is not None:
        blob["ema"] = r.ema.state_dict()
    rundir.save_checkpoint(r.out / "checkpoint.pt", blob)


# --- steps and evaluation -----------------------------------------------------------------------


def train_step(
    model: nn.Module, opt, x: Tensor, y: Tensor, label_smoothing: float = 0.0, task=classify
):
    """One optimiser step on the task's loss; the loss and the task's count, on the device."""
    loss, count = task.loss(model, x, y, label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), count


evaluate = classify.evaluate  # classification's, for the benchmarks and tests


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of the model's weights (None when decay is 0); its decay
    warms up, min(decay, (1 + t) / (10 + t)) at its t-th update, so early averages are not stale."""
    if not decay:
        return None

    def update(ema: list[Tensor], current: list[Tensor], t: Tensor) -> None:
        torch._foreach_lerp_(ema, current, 1 - min(decay, (1 + int(t)) / (10 + int(t))))

    return AveragedModel(model, multi_avg_fn=update)


# --- bookkeeping --------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run's bookkeeping reads and writes: its settings, model, optimiser, state,
    folder and TensorBoard writer, and the training loss and errors since the last log line."""

    cfg: DictConfig
    out: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    d: Splits
    state: State
    writer: SummaryWriter
    bar: tqdm
    task: ModuleType
    ema: AveragedModel | None = None
    loss_sum: Tensor | float = 0.0  # left on the device between log lines
    wrong_sum: Tensor | int = 0
    since_log: int = 0
    estimated: bool = False  # whether the time to the end has been logged
    t_log: float = field(default_factory=time.perf_counter)
    t_mark: float = field(default_factory=time.perf_counter)

    @property
    def training(self) -> bool:
        return self.state.step < self.cfg.train.steps and self.state.status == "ok"

    @property
    def evaluated(self) -> nn.Module:
        """The model that validation, test and the diagnostics see: the average, if kept."""
        return self.model if self.ema is None else self.ema.module


def clock(r: Run) -> None:
    """The loop's wall time so far into the state (it is checkpointed)."""
    now = time.perf_counter()
    r.state.seconds += now - r.t_mark
    r.t_mark = now


def due(every: int, step: int, total: int) -> bool:
    """Whether step (1-based) logs or validates: every ``every`` steps, and at the last."""
    return step % every == 0 or step == total


def stepped(r: Run, loss: Tensor, wrong: Tensor) -> None:
    """After a step's update: count it, log, validate and checkpoint when due."""
    t, state = r.cfg.train, r.state
    r.loss_sum = r.loss_sum + loss
    r.wrong_sum = r.wrong_sum + wrong
    r.since_log += 1
    state.step += 1
    if r.ema is not None:
        r.ema.update_parameters(r.model)
    r.bar.update()
    if due(t.log_every, state.step, t.steps):
        log_training(r)
    if state.status == "ok" and due(t.val_every, state.step, t.steps):
        clock(r)
        t_val = time.perf_counter()
        validate(r)
        state.eval_seconds += time.perf_counter() - t_val
        r.t_log += time.perf_counter() - t_val  # validation is not training throughput
        clock(r)
        save_checkpoint(r)


def log_training(r: Run) -> None:
    """The mean training loss and error since the last log, the lr and the rate; a non-finite
    loss ends the run as diverged."""
    t, step = r.cfg.train, r.state.step
    mean_loss = float(r.loss_sum) / r.since_log  # the one host sync per log_every
    error = 100.0 * int(r.wrong_sum) / (r.since_log * t.batch_size)
    lr = r.cfg.optim.lr * lr_factor(r.cfg.schedule, step - 1, t.steps)
    for tag, value in (("loss/train", mean_loss), ("error/train", error), ("lr", lr)):
        r.writer.add_scalar(tag, value, step)
    rate = r.since_log * t.batch_size / (time.perf_counter() - r.t_log)
    r.bar.set_postfix_str(f"loss {mean_loss:.4f} error {error:.1f}% lr {lr:.2e} {rate:.0f} img/s")
    if not r.estimated:  # once per process: how long the planned steps will take at this rate
        r.estimated = True
        left = datetime.timedelta(seconds=round((t.steps - step) * t.batch_size / rate))
        log.info("%d steps to go: about %s at %.0f img/s", t.steps - step, left, rate)
    r.loss_sum, r.wrong_sum, r.since_log, r.t_log = 0.0, 0, 0, time.perf_counter()
    if not math.isfinite(mean_loss):
        r.state.status, r.state.reason = "diverged", f"non-finite training loss by step {step}"
        log.warning("%s diverged: %s", r.out, r.state.reason)


def diagnose(t, x: Tensor, batch: int, writer, step: int, tag: str = "") -> tuple[float, ...]:
    """One transformer's diagnostics on x to TensorBoard, under ``tag`` (``t2/``: the second of
    several side by side): each parameter's histogram and spread, the distance from the
    identity, the localisation net's dead units, its outputs' ink, 8 inputs beside its outputs.
    Returns the mean distance, the largest spread, the share of dead units and the ink."""
    params, fired = liveness(t, x, batch)  # (N, P), (U,)
    distance = (params - t.identity).norm(dim=1).mean().item()
    spread = params.std(0)  # (P,): how much each parameter follows the input
    for i, name in enumerate(geometry.param_names(t.kind)):
        writer.add_histogram(f"theta/{tag}{name}", params[:, i], step)
        writer.add_scalar(f"transform_spread/{tag}{name}", spread[i], step)
    writer.add_scalar(f"transform/{tag}identity_distance", distance, step)
    share = ink(t, x[:batch])
    writer.add_scalar(f"transform/{tag}ink", share, step)
    with torch.no_grad():
        shown, p = t(x[:8])
    panel = tblog.transform_panel(x[:8], shown, t.kind, p)
    writer.add_image(f"transform/{tag}{tblog.PANEL}", panel, step)
    return distance, spread.max().item(), 1 - fired.float().mean().item(), share


def validate(r: Run) -> None:
    """Validation error (and, for ST models, the transformer's diagnostics) to TensorBoard and
    the log; the best model, divergence and collapse into the state."""
    model, d, t, state, writer = r.evaluated, r.d, r.cfg.train, r.state, r.writer
    step, evaluate = state.step, r.task.evaluate
    model.eval()
    loss, err = evaluate(model, *d["val"], t.eval_batch_size)
    writer.add_scalar("loss/val", loss, step)
    writer.add_scalar("error/val", err, step)
    writer.add_scalar("time/seconds", state.seconds, step)  # the loop's wall time so far
    line = f"step {step}: val loss {loss:.4f}, error {err:.2f}%"
    if models.is_st(r.cfg.model.name):
        _, err_raw = evaluate(model.untransformed, *d["val"], t.eval_batch_size)
        writer.add_scalar("error/val_untransformed", err_raw, step)
        several = len(model.transformers) > 1  # one transformer: its tags as they always were
        distance, spread, dead, shares = zip(*(
            diagnose(tr, d["val"][0], t.eval_batch_size, writer, step, f"t{i + 1}/" * several)
            for i, tr in enumerate(model.transformers)
        ), strict=True)  # fmt: skip
        # a run is as alive as its least alive transformer
        state.transform_spread, state.loc_dead_units = min(spread), max(dead)
        state.transform_ink = min(shares)
        writer.add_scalar("transform/spread", state.transform_spread, step)
        writer.add_scalar("transform/dead_units", state.loc_dead_units, step)
        line += f" (untransformed {err_raw:.2f}%), distance from identity "
        line += f"{', '.join(f'{v:.3f}' for v in distance)}, spread {state.transform_spread:.2g}, "
        line += f"dead units {state.loc_dead_units:.0%}, ink {state.transform_ink:.2f}"
    log.info("%s", line)
    model.train()
    state.last_val = [step, loss, err]
    if not math.isfinite(loss):
        state.status, state.reason = "diverged", f"non-finite validation loss at step {step}"
        return
    if err < state.best_val_error:
        state.best_val_error, state.best_step = err, step
        state.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = t.collapse
    state.streak = state.streak + 1 if err >= c.error else 0
    # near chance for patience validations is a collapse once the run has learned and lost it,
    # its transformer outputs blank images, or it is past its grace: else a slow start
    relapsed = state.best_val_error < c.error
    blank = state.transform_ink is not None and state.transform_ink < BLANK_INK
    late = step >= c.grace * t.steps
    if state.streak >= c.patience and state.collapsed_at is None and (relapsed or blank or late):
        state.collapsed_at = step
        why = "it had learned" if relapsed else "blank transformer outputs" if blank else "late"
        line = f"validation error >= {c.error:g}% for {c.patience} validations by step {step}"
        log.warning("collapse: %s (%s)", line, why)
        if c.stop:
            state.status, state.reason = "collapsed", f"{line} ({why})"


def dead(spread: float | None, share: float | None) -> bool | None:
    """Whether a run's transformer is dead at its last validation: it stopped following its
    input (spread below DEAD_SPREAD), or it samples blank space (its outputs keep less than
    BLANK_INK of the input's ink: flown off the canvas, whatever its spread). None without one."""
    if spread is None:
        return None
    return spread < DEAD_SPREAD or (share is not None and share < BLANK_INK)


def finish(r: Run) -> dict:
    """The final and best-validation models on the test set; metrics.json, written last."""
    clock(r)
    r.bar.close()
    model, d, t, state, cfg = r.evaluated, r.d, r.cfg.train, r.state, r.cfg
    evaluate = r.task.evaluate
    if state.status == "ok" and state.streak >= t.collapse.patience:  # stayed near chance
        state.status, state.reason = "collapsed", f"near chance since step {state.collapsed_at}"
    model.eval()
    final, batch = {}, t.eval_batch_size
    if state.status != "diverged":
        if state.last_val and state.last_val[0] == state.step:  # validated at the end
            final["val_loss"], final["val_error"] = state.last_val[1:]
        else:
            final["val_loss"], final["val_error"] = evaluate(model, *d["val"], batch)
        final["test_loss"], final["test_error"] = evaluate(model, *d["test"], batch)
        if models.is_st(cfg.model.name):
            _, final["test_error_untransformed"] = evaluate(model.untransformed, *d["test"], batch)
    best_test = None
    if state.best_model is not None and state.best_step == state.step and final:
        best_test = final["test_error"]  # the final model is the best one
    elif state.best_model is not None:
        model.load_state_dict(state.best_model)
        _, best_test = evaluate(model, *d["test"], batch)
    train_seconds, spread = max(state.seconds - state.eval_seconds, 1e-9), state.transform_spread
    metrics = {
        "status": state.status,
        "reason": state.reason,
        "test_error": final.get("test_error"),
        "val_error": final.get("val_error"),
        "best_test_error": best_test,
        "best_val_error": None if best_test is None else state.best_val_error,
        "best_step": state.best_step if best_test is not None else None,
        "test_error_untransformed": final.get("test_error_untransformed"),
        "collapsed_at": state.collapsed_at,
        "transform_spread": spread,  # at the last validation (ST models)
        "transform_ink": state.transform_ink,
        "loc_dead_units": state.loc_dead_units,
        "transformer_dead": dead(spread, state.transform_ink),
        "params": models.count(model),
        "steps": state.step,
        "seconds": round(state.seconds, 2),
        "images_per_second": round(state.step * t.batch_size / train_seconds, 1),
        **rundir.settings(cfg),
        "device": str(device.resolve(cfg.device)),
        "threads": torch.get_num_threads(),  # a sweep's jobs may run with fewer than a lone run
    }
    metrics["digest"] = rundir.digest(metrics)
    hparam = {k: metrics[k] for k in HPARAMS} | {"seed": metrics["seed"]}
    hparam |= {"transform": metrics["transform"] or "none", "residual": bool(metrics["residual"])}
    keys = ("test_error", "val_error", "best_test_error")
    final = {k: metrics[k] for k in keys if metrics[k] is not None}
    tblog.write_hparams(r.writer, hparam, final, state.step)
    r.writer.close()
    rundir.write_json(r.out / "metrics.json", metrics)
    log.info("%s: %s; test error %s%% (best-validation model %s%%)", r.out, metrics["status"],
             metrics["test_error"], metrics["best_test_error"])  # fmt: skip
    return metrics


# --- the loop -----------------------------------------------------------------------------------


def train(cfg: DictConfig, out: Path, progress: bool = False, stop=None) -> dict:
    """Train the configured model; return (and write to out/metrics.json) its metrics. ``stop``,
    asked at every step, ends the run as Ctrl-C does (a sweep's launcher stopping it). Where a
    folder beside ``out`` holds this configuration's run already (another spelling of the
    command), that run is the one: its metrics if it is finished, else it trains there."""
    out = Path(out)
    if (first := twin(out, cfg)) is not None:
        if (done := finished(first)) is not None:
            log.info("%s is the same configuration as %s, finished: not training it again",
                     out, first)  # fmt: skip
            return done
        log.info("%s is the same configuration as %s: training it there", out, first)
        out = first
    with claimed(out, cfg):
        return finished(out) or loop(cfg, out, progress, stop or (lambda: False))


def loop(cfg: DictConfig, out: Path, progress: bool, stop) -> dict:
    """The training loop of a run whose folder this process holds (train's)."""
    dev = device.resolve(cfg.device)
    allocator.keep_freed_memory()
    d = load_splits(cfg, dev)
    model = build_model(cfg, dev)
    opt = make_optimizer(model, cfg.optim)
    ema = make_ema(model, cfg.train.ema)
    state = rundir.restore(out, model, opt, ema, State)
    # readers drop what earlier event files logged from this step on (all of it at step 0)
    writer = SummaryWriter(str(out), purge_step=state.step)
    if state.step == 0:
        text = f"{models.count(model):,} learnable parameters\n\n    {model}"
        writer.add_text("model/params", text)
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)  # fmt: skip
    r = Run(cfg, out, model, opt, d, state, writer, bar, tasks.get(cfg.task.name), ema)
    stream = batches(cfg, d, state.step)
    model.train()
    # Ctrl-C and SIGTERM end the loop between two steps, so that its checkpoint resumes exactly
    with logging_redirect_tqdm(), errors.deferred_interrupts() as caught:
        while r.training and not (caught or stop()):
            x, y = next(stream)
            set_lr(opt, lr_factor(cfg.schedule, r.state.step, cfg.train.steps))
            loss, wrong = train_step(model, opt, x, y, cfg.train.label_smoothing, r.task)
            stepped(r, loss, wrong)
        return interrupted(r) if r.training else finish(r)


def interrupted(r: Run):
    """Save the interrupted run's checkpoint and end the command (stnbench.errors.Interrupted)."""
    clock(r)
    r.bar.close()
    save_checkpoint(r)
    r.writer.close()
    log.info("%s: interrupted at step %d; checkpoint saved", r.out, r.state.step)
    raise Interrupted(
        f"{r.out}: interrupted at step {r.state.step}; rerun the same command to resume"
    )
