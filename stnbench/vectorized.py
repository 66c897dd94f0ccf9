"""Several runs as one batched model: ``train_group(cfgs, outs)``.

Runs that share data and architecture and differ only in seed and optimiser scalars (``GROUPED``)
train together: their parameters are stacked along a new leading dimension (K runs) and one
``torch.func.vmap`` of the model computes every run's loss on its own batch, so K small models
make one large computation (convolutions become grouped convolutions, linear layers batched
matrix products). A vectorised SGD or Adam then updates each run with its own learning rate,
momentum and weight decay, with the formulas of torch.optim.SGD and torch.optim.Adam.

Each run keeps its own bookkeeping (stnbench.train's helpers over a module of its own): batches from
its seed, logging, validation, checkpoints, TensorBoard events and metrics.json, exactly as a
separate run writes them. Before a run validates, checkpoints or finishes, its slice of the stacked
tensors is copied into its module and its optimizer's state (a torch.optim optimizer that never
steps), so its checkpoint is a separate run's checkpoint: either can resume the other. A run that
diverges or collapses stops (its slice is frozen and it finishes at once); the others go on.
"""

import copy
import json
import logging
import math
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from stnbench import allocator, device
from stnbench.config import recorded
from stnbench.errors import StnbenchError
from stnbench.optim import is_loc, lr_factor, make_optimizer
from stnbench.train import (
    batches,
    build_model,
    claimed,
    due,
    finish,
    finished,
    load_splits,
    loop,
    start,
    stepped,
)

log = logging.getLogger(__name__)

# Settings that may differ within a group; every other setting must be equal.
GROUPED = ("seed", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.loc_lr_mult")
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8  # torch.optim.Adam's defaults, as make_optimizer uses


def vectorizable(cfg: DictConfig) -> bool:
    """Whether a run can join a group: the stacked step implements plain SGD or Adam on the
    plain loss, and keeps no weight average."""
    t = cfg.train
    return not (cfg.optim.nesterov or t.label_smoothing or t.ema)


def group_key(cfg: DictConfig) -> str:
    """Equal for configs that can train as one group (each other one has a key of its own)."""
    if not vectorizable(cfg):
        return f"alone: {id(cfg)}"
    conf = recorded(OmegaConf.to_container(cfg, resolve=False))
    for key in GROUPED:
        *parents, last = key.split(".")
        node = conf
        for p in parents:
            node = node.get(p, {})
        node.pop(last, None)
    return json.dumps(conf, sort_keys=True, default=str)


class Stacked:
    """K models' parameters stacked (K, ...) as leaves, one vmapped loss, a vectorised optimiser."""

    def __init__(self, modules: list[nn.Module], opts: list, cfgs: list[DictConfig]):
        self.modules, self.opts = modules, opts
        self.kind = cfgs[0].optim.name
        params, self.buffers = stack_module_state(modules)
        self.params = {n: p.detach().contiguous().requires_grad_() for n, p in params.items()}
        self.base = copy.deepcopy(modules[0]).to("meta")
        dev = next(iter(self.params.values())).device

        def per_run(values, p: Tensor) -> Tensor:  # (K,) -> (K, 1, ...) against p
            return torch.tensor(values, dtype=p.dtype, device=dev).view(-1, *[1] * (p.dim() - 1))

        self.lr, self.momentum, self.decay = {}, {}, {}
        for n, p in self.params.items():
            loc = is_loc(n)  # make_optimizer's second group
            self.lr[n] = per_run(
                [c.optim.lr * (c.optim.loc_lr_mult if loc else 1) for c in cfgs], p
            )
            self.momentum[n] = per_run([c.optim.momentum for c in cfgs], p)
            self.decay[n] = per_run([c.optim.weight_decay for c in cfgs], p)
        self.any_decay = any(c.optim.weight_decay for c in cfgs)
        self.t = 0  # optimizer steps taken (Adam's bias correction)
        self.buf = {n: torch.zeros_like(p) for n, p in self.params.items()}  # SGD / Adam m
        self.sq = {n: torch.zeros_like(p) for n, p in self.params.items()}  # Adam v
        self.from_modules()

        def loss(params, buffers, x, y):
            logits = functional_call(self.base, (params, buffers), (x,))
            return F.cross_entropy(logits, y), (logits.argmax(1) != y).sum()

        self._loss = vmap(loss)

    @torch.no_grad()
    def from_modules(self) -> None:
        """Take every run's parameters and optimizer state from its module and optimizer."""
        for k, (module, opt) in enumerate(zip(self.modules, self.opts, strict=True)):
            for n, p in module.named_parameters():
                self.params[n][k].copy_(p)
                state = opt.state.get(p, {})
                if state.get("momentum_buffer") is not None:
                    self.buf[n][k].copy_(state["momentum_buffer"])
                if "exp_avg" in state:
                    self.buf[n][k].copy_(state["exp_avg"])
                    self.sq[n][k].copy_(state["exp_avg_sq"])
                    self.t = int(state["step"])
                elif state:
                    self.t = max(self.t, 1)  # SGD past its first step

    @torch.no_grad()
    def to_module(self, k: int) -> None:
        """Copy run k's slice into its module and its optimizer's state (torch.optim's format)."""
        module, opt = self.modules[k], self.opts[k]
        for n, p in module.named_parameters():
            p.copy_(self.params[n][k])
            if self.t == 0:
                continue
            if self.kind == "sgd":
                if float(self.momentum[n][k]) != 0:
                    opt.state[p] = {"momentum_buffer": self.buf[n][k].clone()}
            else:
                opt.state[p] = {
                    "step": torch.tensor(float(self.t)),
                    "exp_avg": self.buf[n][k].clone(),
                    "exp_avg_sq": self.sq[n][k].clone(),
                }

    def step(
        self, x: Tensor, y: Tensor, factor: float, stopped: list[int]
    ) -> tuple[Tensor, Tensor]:
        """One update of every alive run on its batch x[k], y[k]; per-run loss and wrong counts.
        A stopped run's slice is put back as it was (its gradients may be NaN)."""
        loss, wrong = self._loss(self.params, self.buffers, x, y)
        names = list(self.params)
        grads = torch.autograd.grad(loss.sum(), [self.params[n] for n in names])
        self.t += 1
        with torch.no_grad():
            for n, g in zip(names, grads, strict=True):
                tensors = (self.params[n], self.buf[n], self.sq[n])
                kept = [t[stopped].clone() for t in tensors] if stopped else []
                self._update(n, g, factor)
                for t, old in zip(tensors, kept, strict=False):
                    t[stopped] = old
        return loss.detach(), wrong

    def _update(self, n: str, g: Tensor, factor: float) -> None:
        """torch.optim.SGD's or Adam's update of every run's slice, in place."""
        p, buf = self.params[n], self.buf[n]
        if self.any_decay:
            g = g.addcmul(self.decay[n], p)
        if self.kind == "sgd":  # buf = momentum * buf + g (g at the first step); p -= lr * buf
            if self.t == 1:
                buf.copy_(g)
            else:
                buf.mul_(self.momentum[n]).add_(g)
            p.addcmul_(self.lr[n], buf, value=-factor)
        else:  # Adam: m = lerp(m, g, 1 - beta1); v = beta2 v + (1 - beta2) g^2
            beta1 = self.momentum[n]
            buf.lerp_(g, 1 - beta1)
            self.sq[n].mul_(ADAM_BETA2).addcmul_(g, g, value=1 - ADAM_BETA2)
            denom = self.sq[n].sqrt().div_(math.sqrt(1 - ADAM_BETA2**self.t)).add_(ADAM_EPS)
            step_size = self.lr[n] * factor / (1 - beta1**self.t)  # (K, 1, ...)
            p.addcmul_(step_size, buf / denom, value=-1)


def train_group(cfgs: list[DictConfig], outs: list, tags: list[str] | None = None) -> list[dict]:
    """Train runs that differ only in GROUPED settings as one batched model; return each run's
    metrics (also in its own metrics.json), in order. A finished run is left alone; runs whose
    checkpoints stand at different steps are trained one after another instead."""
    if not all(map(vectorizable, cfgs)):
        raise StnbenchError(
            "runs with optim.nesterov, train.label_smoothing or train.ema train alone"
        )
    if len({group_key(c) for c in cfgs}) > 1:
        raise StnbenchError("these runs differ in more than " + ", ".join(GROUPED))
    with ExitStack() as held:
        for cfg, out in zip(cfgs, outs, strict=True):
            held.enter_context(claimed(Path(out), cfg))
        return _train_group(cfgs, [Path(out) for out in outs], tags)


def _train_group(cfgs: list[DictConfig], outs: list[Path], tags: list[str] | None) -> list[dict]:
    results: list[dict | None] = [finished(out) for out in outs]
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    dev = device.resolve(cfgs[todo[0]].device)
    allocator.keep_freed_memory()
    d = load_splits(cfgs[todo[0]], dev)
    modules = [build_model(cfgs[i], dev) for i in todo]
    opts = [make_optimizer(m, cfgs[i].optim) for i, m in zip(todo, modules, strict=True)]
    tags = tags or [f"[{out}] " for out in outs]
    runs = [
        start(cfgs[i], outs[i], d, m, o, tag=tags[i])
        for i, m, o in zip(todo, modules, opts, strict=True)
    ]
    if len({r.state.step for r in runs}) > 1:  # resumed at different steps
        log.info("checkpoints at different steps; training these runs one after another")
        for i in todo:
            results[i] = loop(cfgs[i], outs[i])
        return results
    stacked = Stacked(modules, opts, [cfgs[i] for i in todo])
    streams = [batches(r.cfg, d, r.state.step) for r in runs]
    stopped = [k for k, r in enumerate(runs) if not r.training]
    for m in modules:
        m.train()
    while len(stopped) < len(runs):
        xy = [next(s) for s in streams]
        x = torch.stack([b[0] for b in xy])  # (K, B, 1, S, S)
        y = torch.stack([b[1] for b in xy])
        r0 = next(r for r in runs if r.training)  # one schedule, one step
        factor = lr_factor(r0.cfg.schedule, r0.state.step, r0.cfg.train.steps)
        loss, wrong = stacked.step(x, y, factor, stopped)
        for k, (i, r) in enumerate(zip(todo, runs, strict=True)):
            if not r.training:
                continue
            if due(r.cfg.train.val_every, r.state.step + 1, r.cfg.train.steps):  # it validates
                stacked.to_module(k)
            stepped(r, loss[k], wrong[k])
            if not r.training:  # finished, diverged or collapsed: its result now
                stopped.append(k)
                stacked.to_module(k)
                results[i] = finish(r, group_size=len(runs))
    return results
