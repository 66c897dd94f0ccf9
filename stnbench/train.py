"""One training run: ``train(cfg, out) -> metrics``, everything it writes under ``out``.

The loop keeps the data on the device and picks each batch by index; the batch of step s is a
pure function of (seed, epoch, position) and the learning rate a pure function of s, so a
checkpoint (model, optimiser, ``State``) is all a resume needs to continue exactly. The helpers
below are functions the loop calls.

Writes: ``metrics.json`` (atomically, last), ``checkpoint.pt`` (at every validation), TensorBoard
event files. The tables use ``test_error``, the final model's, as the paper reports; the
best-validation model's is ``best_test_error``.
"""

import datetime
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stnbench import allocator, data, device, errors, geometry, models, tblog
from stnbench.config import recipe_of, recorded
from stnbench.errors import Fault, Interrupted, StnbenchError, describe, one_line
from stnbench.files import atomic_path
from stnbench.optim import lr_factor, make_optimizer, set_lr
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


def settings(cfg: DictConfig) -> dict:
    """What a run's metrics.json records about its configuration (the report groups by these)."""
    st = models.is_st(cfg.model.name)
    return {
        "data": cfg.data.name,
        "model": cfg.model.name,
        "transform": cfg.transform.kind if st else None,
        "residual": bool(cfg.model.residual or cfg.model.tanh) if st else None,
        "tanh": bool(cfg.model.tanh) if st else None,
        "transformers": cfg.model.transformers if st else None,
        "multi": bool(cfg.model.multi) if st else None,
        "loc_lr_every_transformer": True if st else None,  # see before_loc_lr_fix
        "optim": cfg.optim.name,
        "lr": cfg.optim.lr,
        "loc_lr_mult": cfg.optim.loc_lr_mult,
        "schedule": cfg.schedule.name,
        "planned_steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "train_size": min(cfg.data.train_size or data.TRAIN_SIZE, data.TRAIN_SIZE),
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "fresh": bool(cfg.data.fresh),  # the data regime: a new draw every epoch, or a fixed set
        "searched": bool(cfg.get("optimized_metric")),  # a trial of a search (hparams_search)
        "torch": torch.__version__,
    }


RESULT = ("status", "test_error", "val_error", "best_test_error", "best_val_error", "best_step",
          "test_error_untransformed", "steps")  # fmt: skip


def digest(m: dict) -> str:
    """A digest of a metrics.json's result fields (RESULT): stnbench-report reports a file whose
    results no longer match theirs as inconsistent, never as a result."""
    result = json.dumps({k: m.get(k) for k in RESULT}, sort_keys=True)
    return hashlib.sha256(result.encode()).hexdigest()[:16]


def disagreement(m: dict) -> str | None:
    """Why a metrics.json's result disagrees with itself, or None: its digest, or a best model
    that is the final one (best_step == steps) with another test error."""
    if "digest" in m and m["digest"] != digest(m):
        return "its results do not match their digest (edited after the run wrote them?)"
    if m.get("best_step") is not None and m.get("best_step") == m.get("steps"):
        if m.get("best_test_error") != m.get("test_error"):
            return "the best-validation model is the final one, with another test error"
    return None


def before_loc_lr_fix(m) -> bool:
    """Whether a run's metrics (a dict, or a row of stnbench.report's) are those of a model with
    several transformers trained before commit 666d9d5, when only the first one's localisation
    net got optim.loc_lr_mult's share of the lr and the others the full lr."""

    m = {k: v for k, v in dict(m).items() if v is not None and v == v}  # NaN: not recorded
    several = m.get("transformers", 1) > 1 or m.get("multi") in (True, 1)
    return several and m.get("loc_lr_mult", 1) != 1 and not m.get("loc_lr_every_transformer")


def record_failure(cfg: DictConfig, out: Path, error: BaseException) -> dict:
    """Write metrics.json with status "failed" for a run that raised (if the disk lets us);
    rerunning retries it."""
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
    metrics = {"status": "failed", "reason": reason, "test_error": None, "val_error": None,
               **settings(cfg)}  # fmt: skip
    try:
        return write_json(out / "metrics.json", metrics)
    except OSError as e:  # the fault itself may be a full or read-only disk
        log.warning("%s: could not record the failure in metrics.json: %s", out, e)
        return metrics


def unreadable(path: Path, error: BaseException) -> Fault:
    """The one line for a run file that cannot be read back, with the remedy."""
    return Fault(
        f"{path} is unreadable ({one_line(error)[:160]}); set it aside to start this run over: "
        f"mv {path} {path}.bad"
    )


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from e


@contextmanager
def claimed(out: Path, cfg: DictConfig):
    """Hold a run folder for this process while the block runs. Refused while another process
    holds it (an flock: the kernel drops it when its holder ends, however it ends), and when the
    folder holds a run of another configuration, finished or not (config.json, written when a
    run starts, or the checkpoint of a folder written before it)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise StnbenchError(
                f"{out} is in use by another process (pid {lock.read().strip() or '?'}); wait "
                "for it to end, or choose another output dir"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        mine = recorded(OmegaConf.to_container(cfg))
        path, ckpt = out / "config.json", out / "checkpoint.pt"
        saved = read_json(path) if path.exists() else None
        if saved is None and ckpt.exists():
            saved = load_checkpoint(ckpt, torch.device("cpu"))["config"]
        try:
            diff = saved and difference(recorded(saved), mine)
        except OmegaConfBaseException as e:  # a setting this version does not know
            diff = describe(e)
        if diff:
            raise StnbenchError(
                f"{out} holds a run of another configuration ({diff}); choose another output dir"
            )
        if not path.exists():
            write_json(path, mine)
        yield


def twin(out: Path, cfg: DictConfig) -> Path | None:
    """The folder beside ``out`` (its siblings share its data, model, transform and seed) whose
    config.json is this configuration's, when ``out`` holds no run of its own yet; else None."""
    if (out / "config.json").exists() or not out.parent.is_dir():
        return None
    mine = recorded(OmegaConf.to_container(cfg))
    for path in sorted(out.parent.glob("*/config.json")):
        try:
            if path.parent != out and difference(recorded(read_json(path)), mine) is None:
                return path.parent
        except (Fault, OmegaConfBaseException):  # not readable as a config: not this run's
            continue
    return None


def write_json(path: Path, value: dict) -> dict:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
    return value


def finished(out: Path) -> dict | None:
    """The metrics of a finished run in ``out``, or None (no run, or one that failed: retried)."""
    path = Path(out) / "metrics.json"
    if not path.exists():
        return None
    done = read_json(path)
    if done.get("status") == "failed":
        log.info("%s failed before (%s); trying it again", out, done.get("reason"))
        return None
    log.info("%s is finished (%s); not training it again", out, path.name)
    if before_loc_lr_fix(done):
        log.warning("%s trained its transformers but the first at the full lr (before commit "
                    "666d9d5); move it aside to train it again", out)  # fmt: skip
    return done


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


def load_checkpoint(path: Path, dev: torch.device) -> dict:
    try:
        return torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # truncated, corrupted, not a checkpoint
        raise unreadable(path, e) from e


def trained_model(folder: Path, dev: str = "cpu"):
    """A run's config and its model in eval mode with the weights that validation and test saw
    (the moving average, when train.ema kept one), and the step of its checkpoint."""
    cfg = OmegaConf.load(Path(folder) / ".hydra" / "config.yaml")
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt", torch.device(dev))
    model = build_model(cfg, torch.device(dev))
    weights = ckpt["model"]
    if "ema" in ckpt:  # an AveragedModel's: its module's, and how many it averaged
        weights = {
            k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"
        }
    model.load_state_dict(weights)
    return cfg, model.eval(), ckpt["state"]["step"]


def resume(out: Path, model: nn.Module, opt, ema=None) -> State:
    """The state of the run in ``out`` (its model, optimiser and average loaded), or a fresh
    one. (stnbench.train.claimed has checked that the folder holds this configuration's run.)"""
    path = out / "checkpoint.pt"
    if not path.exists():
        return State()
    ckpt = load_checkpoint(path, next(model.parameters()).device)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        state = State(**ckpt["state"])
    except Exception as e:  # loads, but does not fit this run
        raise unreadable(path, e) from e
    log.info("resuming %s from step %d", out, state.step)
    return state


def difference(saved: dict, current: dict, prefix: str = "") -> str | None:
    """The first setting in which two configs differ, as text; None if they are equal."""
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if diff := difference(a, b, f"{prefix}{key}."):
                return diff
        elif a != b:
            return f"{prefix}{key}: {a!r} there, {b!r} now"
    return None


def save_checkpoint(r: "Run") -> None:
    blob = {"config": OmegaConf.to_container(r.cfg), "model": r.model.state_dict(),
            "optimizer": r.opt.state_dict(), "state": vars(r.state)}  # fmt: skip
    if r.ema is not None:
        blob["ema"] = r.ema.state_dict()
    path = r.out / "checkpoint.pt"
    with atomic_path(path) as tmp:
        try:
            torch.save(blob, tmp)
        except RuntimeError as e:  # torch's writer says "[enforce fail at inline_container.cc
            # ...] ... file write failed" where the disk is full: say that, as an OSError would
            if "file write failed" not in str(e) or shutil.disk_usage(path.parent).free > 2**26:
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


# --- steps and evaluation -----------------------------------------------------------------------


def train_step(model: nn.Module, opt, x: Tensor, y: Tensor, label_smoothing: float = 0.0):
    """One optimiser step; the loss and the number of wrong predictions, left on the device."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.detach().argmax(1) != y).sum()


@torch.no_grad()
def evaluate(fn, x: Tensor, y: Tensor, batch: int) -> tuple[float, float]:
    """Mean cross-entropy and error (percent) of logits fn(x) against y, in batches."""
    loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch):
        logits = fn(x[i : i + batch])
        loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum")
        wrong += (logits.argmax(1) != y[i : i + batch]).sum()
    return loss.item() / len(x), 100.0 * wrong.item() / len(x)


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
    step = state.step
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


def finish(r: Run) -> dict:
    """The final and best-validation models on the test set; metrics.json, written last."""
    clock(r)
    r.bar.close()
    model, d, t, state, cfg = r.evaluated, r.d, r.cfg.train, r.state, r.cfg
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
        "transformer_dead": None if spread is None else spread < DEAD_SPREAD,
        "params": models.count(model),
        "steps": state.step,
        "seconds": round(state.seconds, 2),
        "images_per_second": round(state.step * t.batch_size / train_seconds, 1),
        **settings(cfg),
        "device": str(device.resolve(cfg.device)),
        "threads": torch.get_num_threads(),  # a sweep's jobs may run with fewer than a lone run
    }
    metrics["digest"] = digest(metrics)
    hparam = {k: metrics[k] for k in HPARAMS} | {"seed": metrics["seed"]}
    hparam |= {"transform": metrics["transform"] or "none", "residual": bool(metrics["residual"])}
    keys = ("test_error", "val_error", "best_test_error")
    final = {k: metrics[k] for k in keys if metrics[k] is not None}
    tblog.write_hparams(r.writer, hparam, final, state.step)
    r.writer.close()
    write_json(r.out / "metrics.json", metrics)
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
    state = resume(out, model, opt, ema)
    # readers drop what earlier event files logged from this step on (all of it at step 0)
    writer = SummaryWriter(str(out), purge_step=state.step)
    if state.step == 0:
        text = f"{models.count(model):,} learnable parameters\n\n    {model}"
        writer.add_text("model/params", text)
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not progress, unit="step",
               dynamic_ncols=True, leave=False)  # fmt: skip
    r = Run(cfg, out, model, opt, d, state, writer, bar, ema)
    stream = batches(cfg, d, state.step)
    model.train()
    # Ctrl-C and SIGTERM end the loop between two steps, so that its checkpoint resumes exactly
    with logging_redirect_tqdm(), errors.deferred_interrupts() as caught:
        while r.training and not (caught or stop()):
            x, y = next(stream)
            set_lr(opt, lr_factor(cfg.schedule, r.state.step, cfg.train.steps))
            loss, wrong = train_step(model, opt, x, y, cfg.train.label_smoothing)
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
