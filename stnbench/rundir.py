"""A run's folder: who holds it, which configuration it is bound to, and the files that make it
a run (config.json, checkpoint.pt, metrics.json). The training loop (stnbench.train) calls these;
nothing here trains.

- ``claimed(out, cfg)``: the folder held by this process (an flock) and bound to the config;
  ``twin`` finds another spelling's folder beside it, ``finished`` its finished metrics.
- ``save_checkpoint`` / ``restore``: the checkpoint, written atomically, read back exactly.
- ``trained_model``: a finished run's model with the weights its validation and test saw.
- ``settings``, ``digest``, ``disagreement``: what metrics.json records and how a result that
  disagrees with itself is caught; ``record_failure`` for a run that raised.

What reads runs written by older versions lives in stnbench.legacy.
"""

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stnbench import data, legacy, models, tasks
from stnbench.config import recorded
from stnbench.errors import Fault, StnbenchError, describe, one_line
from stnbench.files import atomic_path

log = logging.getLogger("stnbench.train")  # its lines are the training run's


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
        "loc_lr_every_transformer": True if st else None,  # legacy.before_loc_lr_fix
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
        **tasks.get(tasks.name_of(cfg)).settings(cfg),  # classification's: none
    }


def result_keys(metric: str) -> tuple[str, ...]:
    """A metrics.json's result fields for a task whose metric is named ``metric``."""
    return ("status", f"test_{metric}", f"val_{metric}", f"best_test_{metric}",
            f"best_val_{metric}", "best_step", f"test_{metric}_untransformed", "steps")  # fmt: skip


def metric_of(m: dict) -> str:
    """The name of the metric a metrics.json's run was scored by: its task's (classification's,
    which records no task)."""
    return tasks.get(tasks.name_of(m)).METRIC.name


def digest(m: dict) -> str:
    """A digest of a metrics.json's result fields (result_keys of its task's metric):
    stnbench-report reports a file whose results no longer match theirs as inconsistent, never
    as a result."""
    keys = result_keys(metric_of(m))
    result = json.dumps({k: m.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(result.encode()).hexdigest()[:16]


def disagreement(m: dict) -> str | None:
    """Why a metrics.json's result disagrees with itself, or None: its digest, or a best model
    that is the final one (best_step == steps) with another test error."""
    if "digest" in m and m["digest"] != digest(m):
        return "its results do not match their digest (edited after the run wrote them?)"
    name = metric_of(m)
    if m.get("best_step") is not None and m.get("best_step") == m.get("steps"):
        if m.get(f"best_test_{name}") != m.get(f"test_{name}"):
            return f"the best-validation model is the final one, with another test {name}"
    return None


def record_failure(cfg: DictConfig, out: Path, error: BaseException) -> dict:
    """Write metrics.json with status "failed" for a run that raised (if the disk lets us);
    rerunning retries it."""
    reason = f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
    name = tasks.get(tasks.name_of(cfg)).METRIC.name
    metrics = {"status": "failed", "reason": reason, f"test_{name}": None, f"val_{name}": None,
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
    if legacy.before_loc_lr_fix(done):
        log.warning("%s trained its transformers but the first at the full lr (before commit "
                    "666d9d5); move it aside to train it again", out)  # fmt: skip
    return done


def load_checkpoint(path: Path, dev: torch.device) -> dict:
    try:
        return torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # truncated, corrupted, not a checkpoint
        raise unreadable(path, e) from e


def save_checkpoint(path: Path, blob: dict) -> None:
    """A checkpoint, atomically: a full disk says so (ENOSPC), as any other write would."""
    with atomic_path(path) as tmp:
        try:
            torch.save(blob, tmp)
        except RuntimeError as e:  # torch's writer says "[enforce fail at inline_container.cc
            # ...] ... file write failed" where the disk is full: say that, as an OSError would
            if "file write failed" not in str(e) or shutil.disk_usage(path.parent).free > 2**26:
                raise
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e


def restore(out: Path, model, opt, ema, state_type):
    """The state (a ``state_type``) of the run in ``out``, its model, optimiser and average
    loaded; a fresh ``state_type()`` where it has no checkpoint. (``claimed`` has checked that
    the folder holds this configuration's run.)"""
    path = out / "checkpoint.pt"
    if not path.exists():
        return state_type()
    ckpt = load_checkpoint(path, next(model.parameters()).device)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        state = state_type(**legacy.state_fields(ckpt["state"]))
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


def evaluated_weights(ckpt: dict) -> dict:
    """A checkpoint's weights that validation and test saw: the moving average's module's,
    when train.ema kept one (without how many it averaged), else the model's."""
    if "ema" not in ckpt:
        return ckpt["model"]
    return {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k != "n_averaged"}


def trained_model(folder: Path, dev: str = "cpu"):
    """A run's config and its model (its task's) in eval mode with the weights that validation
    and test saw, and the step of its checkpoint."""
    cfg = OmegaConf.load(Path(folder) / ".hydra" / "config.yaml")
    ckpt = load_checkpoint(Path(folder) / "checkpoint.pt", torch.device(dev))
    model = tasks.get(tasks.name_of(cfg)).build_model(cfg, torch.device(dev), pretrained=False)
    model.load_state_dict(evaluated_weights(ckpt))
    return cfg, model.eval(), ckpt["state"]["step"]
