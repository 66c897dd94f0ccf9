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


def train(cfg: DictConfig, out: Path, progress: bool = False) -> dict:
    """Train the configured model; return (and write to out/metrics.json) its metrics."""
    validate(cfg)
    out = Path(out)
    metrics_path, ckpt_path = out / "metrics.json", out / "checkpoint.pt"
    conf = _container(cfg)
    if metrics_path.exists():
        done = json.loads(metrics_path.read_text())
        if done.get("status") != "failed":
            log.info("%s is finished (%s); not training it again", out, metrics_path.name)
            return done
        log.info("%s failed before (%s); trying it again", out, done.get("reason"))

    dev = device.resolve(cfg.device)
    allocator.keep_freed_memory()
    rec = recipe_of(cfg)
    t_cfg = cfg.train
    n_train = cfg.data.train_size or data.TRAIN_SIZE

    # data, on the device
    def split(name: str, limit: int | None):
        x, y = data.load(cfg.data.name, name, cfg.data.root, cfg.data.seed, dev, rec)
        return x[:limit].to(dev), y[:limit].to(dev)

    x_train, y_train = split("train", n_train)
    x_val, y_val = split("val", t_cfg.val_size)
    x_test, y_test = split("test", None)
    n_train = len(x_train)

    torch.manual_seed(cfg.seed)
    model = models.from_config(_container(cfg.model), _container(cfg.transform), _canvas(rec))
    model = prepare(model, dev)
    is_st = isinstance(model, models.STModel)
    opt = make_optimizer(model, cfg.optim)
    n_params = models.count(model)

    state = {
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
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if diff := _config_difference(ckpt["config"], conf):
            raise StnbenchError(
                f"{out} holds a run of another configuration ({diff}); choose another output dir"
            )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        log.info("resuming %s from step %d", out, state["step"])

    writer = SummaryWriter(str(out), purge_step=state["step"] or None)
    if state["step"] == 0:
        writer.add_text("model/params", f"{n_params:,} learnable parameters\n\n    {model}")
    bar = Progress(progress, t_cfg.steps)
    fixed = x_val[:8]  # the validation batch shown as images

    def checkpoint():
        with atomic_path(ckpt_path) as tmp:
            torch.save(
                {
                    "config": conf,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "state": state,
                },
                tmp,
            )

    def validation(step: int) -> None:
        model.eval()
        loss, err = evaluate(model, x_val, y_val, t_cfg.eval_batch_size)
        writer.add_scalar("val/loss", loss, step)
        writer.add_scalar("val/error", err, step)
        line = f"step {step}: val loss {loss:.4f}, error {err:.2f}%"
        if is_st:
            _, err_raw = evaluate(model.untransformed, x_val, y_val, t_cfg.eval_batch_size)
            writer.add_scalar("val/error_untransformed", err_raw, step)
            kind = model.transformer.kind
            params = predicted_params(model, x_val, t_cfg.eval_batch_size)  # (N, P)
            distance = (params - model.transformer.identity).norm(dim=1).mean().item()
            writer.add_scalar("transform/identity_distance", distance, step)
            for i, name in enumerate(geometry.param_names(kind)):
                writer.add_histogram(f"theta/{name}", params[:, i], step)
            with torch.no_grad():
                shown, p = model.transform(fixed)
            writer.add_image(
                "transform/inputs_and_outputs", tblog.transform_panel(fixed, shown, kind, p), step
            )
            line += f" (untransformed {err_raw:.2f}%), distance from identity {distance:.3f}"
        bar.clear()
        log.info(line)
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
                "collapse at step %d: validation error >= %g%% for %d validations",
                step,
                t_cfg.collapse.error,
                state["streak"],
            )

    # the loop
    per_epoch = n_train // t_cfg.batch_size
    epoch, order = -1, None
    loss_sum = torch.zeros((), device=dev)
    wrong_sum = torch.zeros((), device=dev, dtype=torch.long)
    since_log = 0
    t_mark = t_log = time.perf_counter()

    def clock() -> None:  # wall time of the loop so far into the state (it is checkpointed)
        nonlocal t_mark
        now = time.perf_counter()
        state["seconds"] += now - t_mark
        t_mark = now

    model.train()
    while state["step"] < t_cfg.steps and state["status"] == "ok":
        step = state["step"]
        if step // per_epoch != epoch:  # a new epoch: its order (and its draw, if fresh)
            epoch = step // per_epoch
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(n_train, generator=g).to(dev)
            if cfg.data.fresh:
                fresh_x, _ = data.fresh(
                    cfg.data.name, "train", epoch, cfg.data.root, cfg.data.seed, dev, rec
                )
                x_train = fresh_x[:n_train].to(dev)
        j = step % per_epoch
        idx = order[j * t_cfg.batch_size : (j + 1) * t_cfg.batch_size]
        x, y = x_train[idx], y_train[idx]  # (B, 1, S, S), (B,)
        factor = lr_factor(cfg.schedule, step, t_cfg.steps)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss, wrong = train_step(model, opt, x, y)
        loss_sum += loss
        wrong_sum += wrong
        since_log += 1
        state["step"] = step = step + 1

        if step % t_cfg.log_every == 0 or step == t_cfg.steps:
            mean_loss = loss_sum.item() / since_log  # the one host sync per log_every steps
            error = 100.0 * wrong_sum.item() / (since_log * t_cfg.batch_size)
            writer.add_scalar("train/loss", mean_loss, step)
            writer.add_scalar("train/error", error, step)
            writer.add_scalar("lr", cfg.optim.lr * factor, step)
            rate = since_log * t_cfg.batch_size / (time.perf_counter() - t_log)
            bar.show(
                step,
                f"loss {mean_loss:.4f} error {error:.1f}% lr {cfg.optim.lr * factor:.2e} "
                f"{rate:.0f} img/s",
            )
            loss_sum.zero_()
            wrong_sum.zero_()
            since_log, t_log = 0, time.perf_counter()
            if not math.isfinite(mean_loss):
                state.update(status="diverged", reason=f"non-finite training loss by step {step}")
                bar.clear()
                log.warning("diverged: %s", state["reason"])
        if state["status"] == "ok" and (step % t_cfg.val_every == 0 or step == t_cfg.steps):
            t_val = time.perf_counter()
            validation(step)
            if state["collapsed_at"] is not None and t_cfg.collapse.stop:
                state.update(
                    status="collapsed",
                    reason=f"validation error >= {t_cfg.collapse.error:g}% for "
                    f"{t_cfg.collapse.patience} validations by step {step}",
                )
            state["eval_seconds"] += time.perf_counter() - t_val
            t_log += time.perf_counter() - t_val  # validation time is not training throughput
            clock()
            checkpoint()
    clock()
    bar.close()

    # the end: final and best-validation models on the test set
    if state["status"] == "ok" and state["streak"] >= t_cfg.collapse.patience:  # never recovered
        state.update(status="collapsed", reason=f"near chance since step {state['collapsed_at']}")
    model.eval()
    final, batch = {}, t_cfg.eval_batch_size
    if state["status"] != "diverged":
        if state["last_val"] and state["last_val"][0] == state["step"]:  # validated at the end
            final["val_loss"], final["val_error"] = state["last_val"][1:]
        else:
            final["val_loss"], final["val_error"] = evaluate(model, x_val, y_val, batch)
        final["test_loss"], final["test_error"] = evaluate(model, x_test, y_test, batch)
        if is_st:
            _, final["test_error_untransformed"] = evaluate(
                model.untransformed, x_test, y_test, batch
            )
    best_test = None
    if state["best_model"] is not None and state["best_step"] == state["step"] and final:
        best_test = final["test_error"]  # the final model is the best one
    elif state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
        _, best_test = evaluate(model, x_test, y_test, batch)
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
        "params": n_params,
        "steps": state["step"],
        "seconds": round(state["seconds"], 2),
        "images_per_second": round(
            state["step"] * t_cfg.batch_size / max(state["seconds"] - state["eval_seconds"], 1e-9),
            1,
        ),
        **settings(cfg),
        "device": str(dev),
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
    tblog.write_hparams(writer, hparam, scores)
    writer.close()
    with atomic_path(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "%s: %s; test error %s%% (best-validation model %s%%)",
        out,
        metrics["status"],
        metrics["test_error"],
        metrics["best_test_error"],
    )
    return metrics
