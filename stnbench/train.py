"""One training run: ``train(cfg, out) -> metrics``, everything it writes under ``out``.

What is learned and scored is the task's (stnbench.tasks: its splits, batches, model, loss,
evaluation and metric); the loop names none of them. The data stays on the device, the batch of
step s is a pure function of (seed, step) and the learning rate a pure function of s, so a
checkpoint (model, optimiser, ``State``) is all a resume needs to continue exactly.

Writes, through stnbench.rundir (the folder's lock, its binding to the config, the JSON and
checkpoint files): ``metrics.json`` (atomically, last), ``checkpoint.pt`` (at every validation);
and TensorBoard event files. The tables use ``test_<metric>``, the final model's, as the paper
reports; the best-validation model's is ``best_test_<metric>``.
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

from stnbench import allocator, device, diagnostics, errors, models, rundir, tasks, tblog
from stnbench.errors import Interrupted
from stnbench.optim import lr_factor, make_ema, make_optimizer, set_lr
from stnbench.rundir import claimed, finished, twin
from stnbench.transformer import BLANK_INK

log = logging.getLogger(__name__)
HPARAMS = ("data", "model", "optim", "lr", "loc_lr_mult", "schedule", "batch_size", "train_size")


@dataclass
class State:
    """Where a run stands; checkpointed with the model and the optimiser."""

    step: int = 0
    status: str = "ok"  # ok, diverged or collapsed
    reason: str = ""
    best_val: float | None = None  # the best validation metric (the task's)
    best_step: int = 0
    best_model: dict | None = None  # the best-validation model's state_dict
    streak: int = 0  # validations in a row near chance (train.collapse.error or worse)
    collapsed_at: int | None = None
    seconds: float = 0.0  # wall time of the loop, validation included
    eval_seconds: float = 0.0
    last_val: list | None = None  # [step, loss, metric] of the latest validation
    transform_spread: float | None = None  # ST models, latest validation: see transformer.liveness
    loc_dead_units: float | None = None  # share of the localisation net's units that never fired
    transform_ink: float | None = None  # ST models, latest validation: see transformer.ink


# --- checkpoints and steps ------------------------------------------------------------------------


def save_checkpoint(r: "Run") -> None:
    blob = {"config": OmegaConf.to_container(r.cfg), "model": r.model.state_dict(),
            "optimizer": r.opt.state_dict(), "state": vars(r.state)}  # fmt: skip
    if r.ema is not None:
        blob["ema"] = r.ema.state_dict()
    rundir.save_checkpoint(r.out / "checkpoint.pt", blob)


def train_step(model: nn.Module, opt, x: Tensor, y: Tensor, task, cfg=None):
    """One optimiser step on the task's loss (its settings from cfg, if given); the loss and the
    task's count for the training log, on the device."""
    loss, count = task.loss(model, x, y, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), count


# --- bookkeeping --------------------------------------------------------------------------------


@dataclass
class Run:
    """What one run's bookkeeping reads and writes: its settings, model, optimiser, state,
    folder and TensorBoard writer, and the training loss and errors since the last log line."""

    cfg: DictConfig
    out: Path
    model: nn.Module
    opt: torch.optim.Optimizer
    d: dict  # split -> (inputs, targets) on the device: the task's splits()
    state: State
    writer: SummaryWriter
    bar: tqdm
    task: ModuleType
    ema: AveragedModel | None = None
    loss_sum: Tensor | float = 0.0  # left on the device between log lines
    count_sum: Tensor | int | None = 0  # the task's count for its training metric, if any
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


def stepped(r: Run, loss: Tensor, count: Tensor | None) -> None:
    """After a step's update: count it, log, validate and checkpoint when due."""
    t, state = r.cfg.train, r.state
    r.loss_sum = r.loss_sum + loss
    r.count_sum = None if count is None else r.count_sum + count
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
    """The mean training loss (and the task's metric, where its loss counts one) since the last
    log, the lr and the rate; a non-finite loss ends the run as diverged."""
    t, step, m = r.cfg.train, r.state.step, r.task.METRIC
    mean_loss = float(r.loss_sum) / r.since_log  # the one host sync per log_every
    lr = r.cfg.optim.lr * lr_factor(r.cfg.schedule, step - 1, t.steps)
    logged = {"loss/train": mean_loss}
    if r.count_sum is not None:
        logged[f"{m.name}/train"] = 100.0 * int(r.count_sum) / (r.since_log * t.batch_size)
    for tag, value in (logged | {"lr": lr}).items():
        r.writer.add_scalar(tag, value, step)
    rate = r.since_log * t.batch_size / (time.perf_counter() - r.t_log)
    shown = "".join(f" {m.name} {v:.1f}{m.unit}" for k, v in logged.items() if k != "loss/train")
    r.bar.set_postfix_str(f"loss {mean_loss:.4f}{shown} lr {lr:.2e} {rate:.0f} img/s")
    if not r.estimated:  # once per process: how long the planned steps will take at this rate
        r.estimated = True
        left = datetime.timedelta(seconds=round((t.steps - step) * t.batch_size / rate))
        log.info("%d steps to go: about %s at %.0f img/s", t.steps - step, left, rate)
    r.loss_sum, r.count_sum, r.since_log, r.t_log = 0.0, 0, 0, time.perf_counter()
    if not math.isfinite(mean_loss):
        r.state.status, r.state.reason = "diverged", f"non-finite training loss by step {step}"
        log.warning("%s diverged: %s", r.out, r.state.reason)


def validate(r: Run) -> None:
    """The task's validation metric (and, for models with transformers, their diagnostics) to
    TensorBoard and the log; the best model, divergence and collapse into the state."""
    model, d, t, state, writer = r.evaluated, r.d, r.cfg.train, r.state, r.writer
    step, evaluate, m = state.step, r.task.evaluate, r.task.METRIC
    model.eval()
    loss, value = evaluate(model, *d["val"], t.eval_batch_size)
    writer.add_scalar("loss/val", loss, step)
    writer.add_scalar(f"{m.name}/val", value, step)
    writer.add_scalar("time/seconds", state.seconds, step)  # the loop's wall time so far
    line = f"step {step}: val loss {loss:.4f}, {m.name} {value:.2f}{m.unit}"
    if hasattr(model, "untransformed"):
        _, raw = evaluate(model.untransformed, *d["val"], t.eval_batch_size)
        writer.add_scalar(f"{m.name}/val_untransformed", raw, step)
        line += f" (untransformed {raw:.2f}{m.unit})"
    if hasattr(model, "transformers"):
        # a run is as alive as its least alive transformer
        spread, state.loc_dead_units, state.transform_ink, said = diagnostics.transformers(
            model, d["val"][0], t.eval_batch_size, writer, step
        )
        state.transform_spread = spread
        line += f", {said}"
    log.info("%s", line)
    model.train()
    state.last_val = [step, loss, value]
    if not math.isfinite(loss):
        state.status, state.reason = "diverged", f"non-finite validation loss at step {step}"
        return
    if m.better(value, state.best_val):
        state.best_val, state.best_step = value, step
        state.best_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = t.collapse  # c.error: the metric at or past which a validation is near chance
    state.streak = 0 if m.better(value, c.error) else state.streak + 1
    # near chance for patience validations is a collapse once the run has learned and lost it,
    # its transformer outputs blank images, or it is past its grace: else a slow start
    relapsed = m.better(state.best_val, c.error)
    blank = state.transform_ink is not None and state.transform_ink < BLANK_INK
    late = step >= c.grace * t.steps
    if state.streak >= c.patience and state.collapsed_at is None and (relapsed or blank or late):
        state.collapsed_at = step
        why = "it had learned" if relapsed else "blank transformer outputs" if blank else "late"
        at = ">=" if m.lower_is_better else "<="
        line = f"validation {m.name} {at} {c.error:g}{m.unit} for {c.patience} validations by "
        line += f"step {step}"
        log.warning("collapse: %s (%s)", line, why)
        if c.stop:
            state.status, state.reason = "collapsed", f"{line} ({why})"


def finish(r: Run) -> dict:
    """The final and best-validation models on the test set; metrics.json, written last."""
    clock(r)
    r.bar.close()
    model, d, t, state, cfg = r.evaluated, r.d, r.cfg.train, r.state, r.cfg
    evaluate, name = r.task.evaluate, r.task.METRIC.name
    if state.status == "ok" and state.streak >= t.collapse.patience:  # stayed near chance
        state.status, state.reason = "collapsed", f"near chance since step {state.collapsed_at}"
    model.eval()
    final, batch = {}, t.eval_batch_size
    if state.status != "diverged":
        if state.last_val and state.last_val[0] == state.step:  # validated at the end
            final["val_loss"], final["val"] = state.last_val[1:]
        else:
            final["val_loss"], final["val"] = evaluate(model, *d["val"], batch)
        final["test_loss"], final["test"] = evaluate(model, *d["test"], batch)
        if hasattr(model, "untransformed"):
            _, final["untransformed"] = evaluate(model.untransformed, *d["test"], batch)
    best_test = None
    if state.best_model is not None and state.best_step == state.step and final:
        best_test = final["test"]  # the final model is the best one
    elif state.best_model is not None:
        model.load_state_dict(state.best_model)
        _, best_test = evaluate(model, *d["test"], batch)
    train_seconds, spread = max(state.seconds - state.eval_seconds, 1e-9), state.transform_spread
    metrics = {
        "status": state.status,
        "reason": state.reason,
        f"test_{name}": final.get("test"),
        f"val_{name}": final.get("val"),
        f"best_test_{name}": best_test,
        f"best_val_{name}": None if best_test is None else state.best_val,
        "best_step": state.best_step if best_test is not None else None,
        f"test_{name}_untransformed": final.get("untransformed"),
        "collapsed_at": state.collapsed_at,
        "transform_spread": spread,  # at the last validation (ST models)
        "transform_ink": state.transform_ink,
        "loc_dead_units": state.loc_dead_units,
        "transformer_dead": diagnostics.dead(spread, state.transform_ink),
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
    keys = (f"test_{name}", f"val_{name}", f"best_test_{name}")
    final = {k: metrics[k] for k in keys if metrics[k] is not None}
    tblog.write_hparams(r.writer, hparam, final, state.step)
    r.writer.close()
    rundir.write_json(r.out / "metrics.json", metrics)
    unit = r.task.METRIC.unit
    log.info("%s: %s; test %s %s%s (best-validation model %s%s)", r.out, metrics["status"], name,
             metrics[f"test_{name}"], unit, best_test, unit)  # fmt: skip
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
    task = tasks.get(cfg.task.name)
    d = task.splits(cfg, dev)
    model = task.build_model(cfg, dev)
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
    r = Run(cfg, out, model, opt, d, state, writer, bar, task, ema)
    stream = task.batches(cfg, d, state.step)
    model.train()
    # Ctrl-C and SIGTERM end the loop between two steps, so that its checkpoint resumes exactly
    with logging_redirect_tqdm(), errors.deferred_interrupts() as caught:
        while r.training and not (caught or stop()):
            x, y = next(stream)
            set_lr(opt, lr_factor(cfg.schedule, r.state.step, cfg.train.steps))
            loss, count = train_step(model, opt, x, y, task, cfg)
            stepped(r, loss, count)
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
