"""One training run: ``train(cfg, out) -> metrics``, everything it writes under ``out``.

Sections: validation of the config (at the edge), the schedule and optimiser, evaluation, then
the loop. The loop keeps the data on the device and picks each batch by index; the batch of step
s is a pure function of (seed, epoch, position), and the learning rate a pure function of s, so a
checkpoint (model, optimiser, best model, counters) is all a resume needs to continue exactly.

Writes: ``metrics.json`` (atomically, last), ``checkpoint.pt`` (at every validation), TensorBoard
event files. The tables use ``test_error``, the final model's, as the paper reports; the
best-validation model's is ``best_test_error``.
"""

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from stnbench import allocator, data, device, geometry, mnist, models, tblog
from stnbench.distortions import Recipe
from stnbench.errors import StnbenchError
from stnbench.files import atomic_path

log = logging.getLogger(__name__)

OPTIMS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "exponential", "cosine")
SAME_RUN_EXCEPT = ("device", "data.root", "train.progress")  # settings that leave results alone


# --- validation ---------------------------------------------------------------------------------


def _bad(key: str, expected: str, value) -> StnbenchError:
    return StnbenchError(f"{key} must be {expected}; got {value!r}")


def _int(cfg, key, lo=1, optional=False):
    v = OmegaConf.select(cfg, key)
    if optional and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _bad(key, f"an integer >= {lo}" + (" or null" if optional else ""), v)


def _number(cfg, key, lo=0.0, hi=math.inf, lo_open=False, hi_open=False):
    v = OmegaConf.select(cfg, key)
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lo_s, hi_s = ("(" if lo_open else "[") + f"{lo:g}", f"{hi:g}" + (")" if hi_open else "]")
        raise _bad(key, f"a number in {lo_s}, {hi_s}", v)


def _bool(cfg, key):
    if not isinstance(OmegaConf.select(cfg, key), bool):
        raise _bad(key, "true or false", OmegaConf.select(cfg, key))


def recipe_of(cfg: DictConfig) -> Recipe | None:
    r = cfg.data.recipe
    return None if r is None else Recipe.from_dict(OmegaConf.to_container(r), "data.recipe")


def validate(cfg: DictConfig) -> None:
    """Every setting a run depends on, checked before anything is written."""
    _int(cfg, "seed", 0)
    device.resolve(cfg.device)
    data.recipe(cfg.data.name)
    rec = recipe_of(cfg)
    _int(cfg, "data.seed", 0)
    _int(cfg, "data.train_size", 1, optional=True)
    _bool(cfg, "data.fresh")
    mnist.data_root(cfg.data.root)
    if cfg.optim.name not in OPTIMS:
        raise _bad("optim.name", f"one of {', '.join(OPTIMS)}", cfg.optim.name)
    _number(cfg, "optim.lr", lo_open=True)
    _number(cfg, "optim.momentum", 0, 1, hi_open=True)
    _number(cfg, "optim.weight_decay")
    _number(cfg, "optim.loc_lr_mult")
    if cfg.schedule.name not in SCHEDULES:
        raise _bad("schedule.name", f"one of {', '.join(SCHEDULES)}", cfg.schedule.name)
    if cfg.schedule.name in ("step", "exponential"):
        _int(cfg, "schedule.every")
        _number(cfg, "schedule.gamma", 0, 1, lo_open=True)
    if cfg.schedule.name == "cosine":
        _number(cfg, "schedule.floor", 0, 1)
    for key in ("steps", "batch_size", "val_every", "log_every", "eval_batch_size"):
        _int(cfg, f"train.{key}")
    _int(cfg, "train.val_size", 1, optional=True)
    _number(cfg, "train.collapse.error", 0, 100, lo_open=True)
    _int(cfg, "train.collapse.patience")
    _bool(cfg, "train.collapse.stop")
    if cfg.train.progress not in ("auto", True, False):
        raise _bad("train.progress", "auto, true or false", cfg.train.progress)
    n = min(cfg.data.train_size or data.TRAIN_SIZE, data.TRAIN_SIZE)
    if cfg.train.batch_size > n:
        raise StnbenchError(
            f"train.batch_size ({cfg.train.batch_size}) is larger than the training set "
            f"({n} images; data.train_size)"
        )
    with torch.device("meta"):  # the model's options, without building it for real
        models.from_config(_container(cfg.model), _container(cfg.transform), _canvas(rec))


def _container(node):
    return OmegaConf.to_container(node, resolve=True)


def _canvas(rec: Recipe | None) -> int:
    return 28 if rec is None else rec.canvas


def settings(cfg: DictConfig) -> dict:
    """What a run's metrics.json records about its configuration (the report groups by these)."""
    is_st = "residual" in cfg.model  # ST models' options; fcn and cnn have no transformer
    return {
        "data": cfg.data.name,
        "model": cfg.model.name,
        "transform": cfg.transform.kind if is_st else None,
        "residual": bool(cfg.model.residual or cfg.model.tanh) if is_st else None,
        "tanh": bool(cfg.model.tanh) if is_st else None,
        "optim": cfg.optim.name,
        "lr": cfg.optim.lr,
        "loc_lr_mult": cfg.optim.loc_lr_mult,
        "schedule": cfg.schedule.name,
        "planned_steps": cfg.train.steps,
        "batch_size": cfg.train.batch_size,
        "train_size": min(cfg.data.train_size or data.TRAIN_SIZE, data.TRAIN_SIZE),
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "torch": torch.__version__,
    }


def record_failure(cfg: DictConfig, out: Path, error: BaseException) -> dict:
    """Write metrics.json with status "failed" for a run that raised; rerunning retries it."""
    metrics = {
        "status": "failed",
        "reason": f"{type(error).__name__}: {' '.join(str(error).split())}"[:500],
        "test_error": None,
        "val_error": None,
        **settings(cfg),
    }
    with atomic_path(Path(out) / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# --- optimisation -------------------------------------------------------------------------------


def lr_factor(schedule: DictConfig, step: int, total: int) -> float:
    """The schedule's multiplier of the base learning rate at ``step`` (0-based)."""
    if schedule.name == "step":
        return schedule.gamma ** (step // schedule.every)
    if schedule.name == "exponential":
        return schedule.gamma ** (step / schedule.every)
    if schedule.name == "cosine":
        return schedule.floor + (1 - schedule.floor) * (1 + math.cos(math.pi * step / total)) / 2
    return 1.0


def make_optimizer(model: nn.Module, optim: DictConfig) -> torch.optim.Optimizer:
    """SGD or Adam; the localisation net gets ``loc_lr_mult`` times the learning rate."""
    loc = [p for n, p in model.named_parameters() if n.startswith("transformer.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("transformer.")]
    groups = [{"params": rest, "base_lr": optim.lr}]
    if loc:
        groups.append({"params": loc, "base_lr": optim.lr * optim.loc_lr_mult})
    for g in groups:
        g["lr"] = g["base_lr"]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.Adam(groups, betas=(optim.momentum, 0.999), weight_decay=optim.weight_decay)


def prepare(model: nn.Module, dev: torch.device) -> nn.Module:
    """The model as the loop runs it: on the device, its convolutions in channels_last memory
    (+14% ST-CNN on RTS, +22% CNN on 28x28 training throughput on the 2-core CPU; measured with
    scripts/bench_train.py)."""
    return model.to(dev, memory_format=torch.channels_last)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor):
    """One optimiser step; the loss and the number of wrong predictions, left on the device."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.detach().argmax(1) != y).sum()


# --- evaluation ---------------------------------------------------------------------------------


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


@torch.no_grad()
def predicted_params(model: models.STModel, x: Tensor, batch: int) -> Tensor:
    return torch.cat([model.transformer.params(x[i : i + batch]) for i in range(0, len(x), batch)])


# --- the run ------------------------------------------------------------------------------------


def _config_difference(saved: dict, current: dict, prefix="") -> str | None:
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        if path in SAME_RUN_EXCEPT:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if diff := _config_difference(a, b, f"{path}."):
                return diff
        elif a != b:
            return f"{path}: {a!r} there, {b!r} now"
    return None


class Progress:
    """One line on a terminal, rewritten in place; nothing under launchers or in logs."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def show(self, step: int, text: str) -> None:
        if self.enabled:
            print(f"\r\033[K[{step}/{self.total}] {text}", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        """Wipe the line, so a log message starts on a clean one."""
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def finished(out: Path) -> dict | None:
    """The metrics of a finished run in ``out``, or None (no run, or one that failed: retried)."""
    path = Path(out) / "metrics.json"
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    if done.get("status") == "failed":
        log.info("%s failed before (%s); trying it again", out, done.get("reason"))
        return None
    log.info("%s is finished (%s); not training it again", out, path.name)
    return done


class Data:
    """A run's splits on the device, shared by the runs of a vectorised group (which differ only
    in seed and optimiser settings): train (redrawn each epoch when data.fresh), val and test."""

    def __init__(self, cfg: DictConfig, dev: torch.device):
        self.cfg, self.dev, self.rec = cfg, dev, recipe_of(cfg)

        def split(name: str, limit: int | None):
            x, y = data.load(cfg.data.name, name, cfg.data.root, cfg.data.seed, dev, self.rec)
            return x[:limit].to(dev), y[:limit].to(dev)

        self.x_train, self.y_train = split("train", cfg.data.train_size or data.TRAIN_SIZE)
        self.x_val, self.y_val = split("val", cfg.train.val_size)
        self.x_test, self.y_test = split("test", None)
        self.n_train = len(self.x_train)
        self.canvas = _canvas(self.rec)
        self._epoch = None

    def train_x(self, epoch: int) -> Tensor:
        """The training images of an epoch: a fresh draw of the distortions when data.fresh."""
        c = self.cfg.data
        if c.fresh and epoch != self._epoch:
            x, _ = data.fresh(c.name, "train", epoch, c.root, c.seed, self.dev, self.rec)
            self.x_train, self._epoch = x[: self.n_train].to(self.dev), epoch
        return self.x_train


def build_model(cfg: DictConfig, d: Data) -> nn.Module:
    """The run's model, initialised from its seed, as the loop runs it."""
    torch.manual_seed(cfg.seed)
    model = models.from_config(_container(cfg.model), _container(cfg.transform), d.canvas)
    return prepare(model, d.dev)


class Run:
    """One run's bookkeeping around a training loop that steps its model: the batch and learning
    rate of each step, logging, validation, collapse and divergence, checkpoints (and resume from
    one), and the metrics at the end. ``train`` drives one Run; a vectorised group drives several,
    each over its own model and optimizer, whose tensors the group keeps in sync."""

    def __init__(self, cfg: DictConfig, out: Path, progress: bool, d: Data, model, opt, tag=""):
        self.cfg, self.out, self.d, self.model, self.opt = cfg, Path(out), d, model, opt
        self.tag = tag  # before each log line (which run of a group it is)
        self.t_cfg = t_cfg = cfg.train
        self.metrics_path, self.ckpt_path = self.out / "metrics.json", self.out / "checkpoint.pt"
        self.conf = _container(cfg)
        self.is_st = isinstance(model, models.STModel)
        self.n_params = models.count(model)
        self.state = {
            "step": 0,
            "status": "ok",
            "reason": "",
            "best_val_error": math.inf,
            "best_step": 0,
            "best_model": None,
            "streak": 0,
            "collapsed_at": None,
            "seconds": 0.0,
            "eval_seconds": 0.0,
            "last_val": None,  # [step, loss, error] of the latest validation
        }
        if self.ckpt_path.exists():
            ckpt = torch.load(self.ckpt_path, map_location=d.dev, weights_only=True)
            if diff := _config_difference(ckpt["config"], self.conf):
                raise StnbenchError(
                    f"{out} holds a run of another configuration ({diff}); choose another "
                    "output dir"
                )
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            self.state = ckpt["state"]
            log.info("resuming %s from step %d", out, self.state["step"])
        self.writer = SummaryWriter(str(self.out), purge_step=self.state["step"] or None)
        if self.state["step"] == 0:
            self.writer.add_text(
                "model/params", f"{self.n_params:,} learnable parameters\n\n    {model}"
            )
        self.bar = Progress(progress, t_cfg.steps)
        self.fixed = d.x_val[:8]  # the validation batch shown as images
        self.per_epoch = d.n_train // t_cfg.batch_size
        self.epoch, self.order = -1, None
        self.loss_sum = torch.zeros((), device=d.dev)
        self.wrong_sum = torch.zeros((), device=d.dev, dtype=torch.long)
        self.since_log = 0
        self.t_mark = self.t_log = time.perf_counter()

    @property
    def training(self) -> bool:
        return self.state["step"] < self.t_cfg.steps and self.state["status"] == "ok"

    def batch(self) -> tuple[Tensor, Tensor]:
        """The step's batch: a pure function of (seed, epoch, position), so resume is exact."""
        step, b = self.state["step"], self.t_cfg.batch_size
        if step // self.per_epoch != self.epoch:  # a new epoch: its order (and its draw)
            self.epoch = step // self.per_epoch
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch)
            self.order = torch.randperm(self.d.n_train, generator=g).to(self.d.dev)
        j = step % self.per_epoch
        idx = self.order[j * b : (j + 1) * b]
        return self.d.train_x(self.epoch)[idx], self.d.y_train[idx]  # (B, 1, S, S), (B,)

    def lr_factor(self) -> float:
        return lr_factor(self.cfg.schedule, self.state["step"], self.t_cfg.steps)

    def _validates_at(self, step: int) -> bool:
        return step % self.t_cfg.val_every == 0 or step == self.t_cfg.steps

    def validates_after_step(self) -> bool:
        """Whether the coming step ends in a validation (and a checkpoint)."""
        return self._validates_at(self.state["step"] + 1)

    def clock(self) -> None:  # wall time of the loop so far into the state (it is checkpointed)
        now = time.perf_counter()
        self.state["seconds"] += now - self.t_mark
        self.t_mark = now

    def stepped(self, loss: Tensor, wrong: Tensor, factor: float) -> None:
        """After the step's update: count it, log, validate and checkpoint when due."""
        state, t_cfg = self.state, self.t_cfg
        self.loss_sum += loss
        self.wrong_sum += wrong
        self.since_log += 1
        state["step"] = step = state["step"] + 1

        if step % t_cfg.log_every == 0 or step == t_cfg.steps:
            mean_loss = self.loss_sum.item() / self.since_log  # the one host sync per log_every
            error = 100.0 * self.wrong_sum.item() / (self.since_log * t_cfg.batch_size)
            lr = self.cfg.optim.lr * factor
            self.writer.add_scalar("train/loss", mean_loss, step)
            self.writer.add_scalar("train/error", error, step)
            self.writer.add_scalar("lr", lr, step)
            rate = self.since_log * t_cfg.batch_size / (time.perf_counter() - self.t_log)
            text = f"loss {mean_loss:.4f} error {error:.1f}% lr {lr:.2e} {rate:.0f} img/s"
            self.bar.show(step, text)
            self.loss_sum.zero_()
            self.wrong_sum.zero_()
            self.since_log, self.t_log = 0, time.perf_counter()
            if not math.isfinite(mean_loss):
                state.update(status="diverged", reason=f"non-finite training loss by step {step}")
                self.bar.clear()
                log.warning("%s diverged: %s", self.out, state["reason"])
        if state["status"] == "ok" and self._validates_at(step):
            t_val = time.perf_counter()
            self.validation(step)
            if state["collapsed_at"] is not None and t_cfg.collapse.stop:
                state.update(
                    status="collapsed",
                    reason=f"validation error >= {t_cfg.collapse.error:g}% for "
                    f"{t_cfg.collapse.patience} validations by step {step}",
                )
            state["eval_seconds"] += time.perf_counter() - t_val
            self.t_log += time.perf_counter() - t_val  # validation is not training throughput
            self.clock()
            self.checkpoint()

    def checkpoint(self) -> None:
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(
                {
                    "config": self.conf,
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "state": self.state,
                },
                tmp,
            )

    def validation(self, step: int) -> None:
        model, d, t_cfg, state, writer = self.model, self.d, self.t_cfg, self.state, self.writer
        model.eval()
        loss, err = evaluate(model, d.x_val, d.y_val, t_cfg.eval_batch_size)
        writer.add_scalar("val/loss", loss, step)
        writer.add_scalar("val/error", err, step)
        line = f"step {step}: val loss {loss:.4f}, error {err:.2f}%"
        if self.is_st:
            _, err_raw = evaluate(model.untransformed, d.x_val, d.y_val, t_cfg.eval_batch_size)
            writer.add_scalar("val/error_untransformed", err_raw, step)
            kind = model.transformer.kind
            params = predicted_params(model, d.x_val, t_cfg.eval_batch_size)  # (N, P)
            distance = (params - model.transformer.identity).norm(dim=1).mean().item()
            writer.add_scalar("transform/identity_distance", distance, step)
            for i, name in enumerate(geometry.param_names(kind)):
                writer.add_histogram(f"theta/{name}", params[:, i], step)
            with torch.no_grad():
                shown, p = model.transform(self.fixed)
            panel = tblog.transform_panel(self.fixed, shown, kind, p)
            writer.add_image("transform/inputs_and_outputs", panel, step)
            line += f" (untransformed {err_raw:.2f}%), distance from identity {distance:.3f}"
        self.bar.clear()
        log.info("%s%s", self.tag, line)
        model.train()
        state["last_val"] = [step, loss, err]
        if not math.isfinite(loss):
            state.update(status="diverged", reason=f"non-finite validation loss at step {step}")
            return
        if err < state["best_val_error"]:
            state.update(
                best_val_error=err,
                best_step=step,
                best_model={k: v.detach().clone() for k, v in model.state_dict().items()},
            )
        state["streak"] = state["streak"] + 1 if err >= t_cfg.collapse.error else 0
        if state["streak"] >= t_cfg.collapse.patience and state["collapsed_at"] is None:
            state["collapsed_at"] = step
            log.warning(
                "%scollapse at step %d: validation error >= %g%% for %d validations",
                self.tag,
                step,
                t_cfg.collapse.error,
                state["streak"],
            )

    def finish(self, **extra) -> dict:
        """The final and best-validation models on the test set; metrics.json, written last."""
        self.clock()
        self.bar.close()
        model, d, t_cfg, state, cfg = self.model, self.d, self.t_cfg, self.state, self.cfg
        if state["status"] == "ok" and state["streak"] >= t_cfg.collapse.patience:  # stayed
            reason = f"near chance since step {state['collapsed_at']}"
            state.update(status="collapsed", reason=reason)
        model.eval()
        final, batch = {}, t_cfg.eval_batch_size
        if state["status"] != "diverged":
            if state["last_val"] and state["last_val"][0] == state["step"]:  # validated at the end
                final["val_loss"], final["val_error"] = state["last_val"][1:]
            else:
                final["val_loss"], final["val_error"] = evaluate(model, d.x_val, d.y_val, batch)
            final["test_loss"], final["test_error"] = evaluate(model, d.x_test, d.y_test, batch)
            if self.is_st:
                _, final["test_error_untransformed"] = evaluate(
                    model.untransformed, d.x_test, d.y_test, batch
                )
        best_test = None
        if state["best_model"] is not None and state["best_step"] == state["step"] and final:
            best_test = final["test_error"]  # the final model is the best one
        elif state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
            _, best_test = evaluate(model, d.x_test, d.y_test, batch)
        train_seconds = max(state["seconds"] - state["eval_seconds"], 1e-9)
        metrics = {
            "status": state["status"],
            "reason": state["reason"],
            "test_error": final.get("test_error"),
            "val_error": final.get("val_error"),
            "best_test_error": best_test,
            "best_val_error": None if best_test is None else state["best_val_error"],
            "best_step": state["best_step"] if best_test is not None else None,
            "test_error_untransformed": final.get("test_error_untransformed"),
            "collapsed_at": state["collapsed_at"],
            "params": self.n_params,
            "steps": state["step"],
            "seconds": round(state["seconds"], 2),
            "images_per_second": round(state["step"] * t_cfg.batch_size / train_seconds, 1),
            **settings(cfg),
            "device": str(d.dev),
            **extra,
        }
        hparam = {
            k: metrics[k]
            for k in (
                "data",
                "model",
                "optim",
                "lr",
                "loc_lr_mult",
                "schedule",
                "batch_size",
                "train_size",
                "seed",
            )
        }
        hparam["transform"] = metrics["transform"] or "none"
        hparam["residual"] = bool(metrics["residual"])
        scores = {
            k: metrics[k]
            for k in ("test_error", "val_error", "best_test_error")
            if metrics[k] is not None
        }
        tblog.write_hparams(self.writer, hparam, scores)
        self.writer.close()
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        log.info(
            "%s: %s; test error %s%% (best-validation model %s%%)",
            self.out,
            metrics["status"],
            metrics["test_error"],
            metrics["best_test_error"],
        )
        return metrics


def train(cfg: DictConfig, out: Path, progress: bool = False) -> dict:
    """Train the configured model; return (and write to out/metrics.json) its metrics."""
    validate(cfg)
    if (done := finished(out)) is not None:
        return done
    dev = device.resolve(cfg.device)
    allocator.keep_freed_memory()
    d = Data(cfg, dev)
    model = build_model(cfg, d)
    opt = make_optimizer(model, cfg.optim)
    run = Run(cfg, out, progress, d, model, opt)
    model.train()
    while run.training:
        x, y = run.batch()
        factor = run.lr_factor()
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss, wrong = train_step(model, opt, x, y)
        run.stepped(loss, wrong, factor)
    return run.finish()
