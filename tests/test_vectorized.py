"""Vectorised groups: each run of a group matches its separate run, a diverging run spoils no
other, the optimizer state is torch.optim's, and hydra/launcher=vectorized through the CLI.

Tolerance. A group computes the same sums in another order (grouped convolutions, batched matrix
products, the vectorised optimizer's arithmetic), so results agree up to floating-point
reassociation: the training loss of each of the first steps within 1e-5 (relative), and, since
training amplifies such differences step by step, the final errors within 1.5 points after 40
steps of ST-CNN (measured: up to 0.4). FCN groups have agreed to every printed digit."""

import json
import subprocess

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stnbench.cli import load_config
from stnbench.train import make_optimizer, train
from stnbench.vectorized import group_key, train_group

TINY = [
    "data=plain",
    "data.train_size=2000",
    "train.batch_size=64",
    "train.val_size=500",
    "schedule=cosine",
]
pytestmark = pytest.mark.slow  # every test here trains
LOSS_RTOL = 1e-5  # per-step training loss, over the first steps
ERROR_ATOL = 1.5  # final test and validation error (points), after 40 steps


def configs(model, lrs, *extra):
    return [
        load_config(
            "stnbench_train", [*TINY, f"model={model}", f"optim.lr={lr}", f"seed={i}", *extra]
        )
        for i, lr in enumerate(lrs)
    ]


def losses(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [s.value for s in acc.Scalars("train/loss")]


@pytest.fixture(scope="module")
def st_cnn_group(mnist_root, tmp_path_factory):
    """Three learning rates (and seeds) of ST-CNN, separately and as one group."""
    tmp = tmp_path_factory.mktemp("group")
    cfgs = configs("st_cnn", [0.005, 0.01, 0.02], "train.steps=40", "train.val_every=20",
                   "train.log_every=1")  # fmt: skip
    separate = [train(c, tmp / f"separate{i}") for i, c in enumerate(cfgs)]
    group = train_group(cfgs, [tmp / f"group{i}" for i in range(3)])
    return tmp, separate, group


def test_each_run_of_a_group_matches_its_separate_run(st_cnn_group):
    tmp, separate, group = st_cnn_group
    for i, (a, b) in enumerate(zip(separate, group, strict=True)):
        assert a["status"] == b["status"] == "ok" and a["steps"] == b["steps"] == 40
        for key in ("test_error", "val_error", "test_error_untransformed", "best_test_error"):
            assert b[key] == pytest.approx(a[key], abs=ERROR_ATOL), key
        la, lb = losses(tmp / f"separate{i}"), losses(tmp / f"group{i}")
        assert len(la) == len(lb) == 40
        assert lb[:5] == pytest.approx(la[:5], rel=LOSS_RTOL)
        assert b["group_size"] == 3 and b["lr"] == a["lr"] and b["seed"] == a["seed"] == i
        on_disk = json.loads((tmp / f"group{i}" / "metrics.json").read_text())
        assert on_disk == b


def test_a_group_writes_what_a_separate_run_writes(st_cnn_group):
    tmp, _, _ = st_cnn_group
    for name in ("separate0", "group0"):
        acc = EventAccumulator(str(tmp / name))
        acc.Reload()
        tags = acc.Tags()
        assert {"val/error", "val/error_untransformed", "lr"} <= set(tags["scalars"])
        assert "theta/a11" in tags["histograms"]
        assert "transform/inputs_and_outputs" in tags["images"]
    a = torch.load(tmp / "separate0" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp / "group0" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and a["state"]["step"] == b["state"]["step"]
    cfg = load_config("stnbench_train", [*TINY, "model=st_cnn"])
    from stnbench import models

    model = models.from_config(
        OmegaConf.to_container(cfg.model), OmegaConf.to_container(cfg.transform), 28
    )
    model.load_state_dict(b["model"])
    opt = make_optimizer(model, cfg.optim)
    opt.load_state_dict(b["optimizer"])  # a group's checkpoint is a separate run's: it resumes
    buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(torch.isfinite(x).all() for x in buffers) and any(x.abs().sum() > 0 for x in buffers)


def test_a_diverging_run_spoils_no_other(mnist_root, tmp_path):
    cfgs = configs("fcn", [0.01, 1e6, 0.02], "train.steps=40", "train.val_every=20",
                   "train.log_every=10")  # fmt: skip
    group = train_group(cfgs, [tmp_path / f"g{i}" for i in range(3)])
    assert group[1]["status"] == "diverged" and group[1]["steps"] == 10
    assert group[1]["test_error"] is None
    for i in (0, 2):
        alone = train(cfgs[i], tmp_path / f"alone{i}")
        assert group[i]["status"] == "ok" and group[i]["steps"] == 40
        assert group[i]["test_error"] == pytest.approx(alone["test_error"], abs=0.05)
        assert group[i]["val_error"] == pytest.approx(alone["val_error"], abs=0.05)


def test_adam_groups_match_separate_runs(mnist_root, tmp_path):
    cfgs = configs("st_fcn", [1e-4, 1e-3], "optim=adam", "train.steps=5", "train.val_every=5",
                   "train.log_every=1", "optim.weight_decay=1e-4")  # fmt: skip
    train_group(cfgs, [tmp_path / f"g{i}" for i in range(2)])
    for i, c in enumerate(cfgs):
        train(c, tmp_path / f"s{i}")
        assert losses(tmp_path / f"g{i}") == pytest.approx(losses(tmp_path / f"s{i}"), rel=1e-5)


def test_what_groups():
    a, b = configs("st_cnn", [0.01, 0.02])
    assert group_key(a) == group_key(b)  # lr and seed differ: one group
    (c,) = configs("cnn", [0.01])
    (d,) = configs("st_cnn", [0.01], "train.steps=7")
    assert len({group_key(a), group_key(c), group_key(d)}) == 3


def test_vectorized_launcher_through_the_cli(mnist_root, bin_dir, tmp_path):
    args = [*TINY, "train.steps=20", "train.val_every=10", "train.log_every=10",
            "model=fcn,st_fcn", "optim.lr=0.01,0.02,1e6"]  # fmt: skip
    command = [str(bin_dir / "stnbench-train"), "-m", *args, "hydra.sweep.dir=runs"]
    r = subprocess.run(
        [*command, "hydra/launcher=vectorized"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 jobs as 2 vectorised groups (sizes 3, 3)" in r.stderr + r.stdout
    assert "6 jobs: 2 diverged, 4 ok" in r.stdout
    folders = sorted(p.parent for p in (tmp_path / "runs").rglob("metrics.json"))
    assert len(folders) == 6
    for folder in folders:
        m = json.loads((folder / "metrics.json").read_text())
        assert m["status"] == ("diverged" if m["lr"] == 1e6 else "ok")
        assert (folder / ".hydra" / "config.yaml").exists() and (folder / "train.log").exists()
        assert "step 10" in (folder / "train.log").read_text() or m["status"] == "diverged"
        assert list(folder.glob("events.out.tfevents.*"))
    # the same command again: every job is finished, nothing trains
    again = subprocess.run(
        [*command, "hydra/launcher=vectorized"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert again.returncode == 0 and "not training it again" in again.stderr + again.stdout
