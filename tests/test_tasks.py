"""The task layer (stnbench.tasks): every registered task trains a few steps and reports its
metric well clear of chance; classification's loss and metric are torch's."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stnbench import tasks
from stnbench.cli import load_config
from stnbench.errors import StnbenchError
from stnbench.train import train


@pytest.mark.parametrize("name", tasks.TASKS)
def test_every_task_trains_a_few_steps_and_reports_its_metric(name, mnist_root, tmp_path):
    task = tasks.get(name)
    args = [f"task={name}", "data=plain", "model=fcn", "data.train_size=3000",
            "train.batch_size=64", "train.steps=60", "train.val_every=30",
            "train.val_size=500"]  # fmt: skip
    m = train(load_config("stnbench_train", args), tmp_path / "run")
    metric = task.METRIC
    assert m["status"] == "ok"
    for split in ("test", "val", "best_test"):
        value = m[f"{split}_{metric.name}"]
        assert value < metric.chance / 2 if metric.lower_is_better else value > 2 * metric.chance


def test_classification_is_cross_entropy_and_the_error_of_the_argmax():
    torch.manual_seed(0)
    x, y = torch.randn(100, 7), torch.randint(0, 7, (100,))
    model = torch.nn.Identity()
    classify = tasks.get("classify")
    loss, wrong = classify.loss(model, x, y, 0.1)
    assert torch.equal(loss, F.cross_entropy(x, y, label_smoothing=0.1))
    assert int(wrong) == int((x.argmax(1) != y).sum())
    mean, error = classify.evaluate(model, x, y, 32)  # in batches of 32, 32, 32, 4
    assert mean == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    assert error == 100.0 * int(wrong) / 100


def test_an_unknown_task_is_one_line():
    with pytest.raises(StnbenchError, match=r"^task=nosuch: no such task \(expected one of "):
        tasks.get("nosuch")


def test_a_classification_runs_identity_is_what_it_was_before_tasks():
    """Naming the default task changes no run's identity: runs from before tasks existed are
    found, resumed and counted once with those after. The digest is the one paper_budget's
    runs.csv recorded for this run before the task group existed."""
    from stnbench.config import identity, recorded

    args = ["experiment=paper_fcn", "data=r", "row=st_fcn_aff", "seed=0"]
    cfg = OmegaConf.to_container(load_config("stnbench_train", args))
    assert cfg["task"] == {"name": "classify"} and "task" not in recorded(cfg)
    assert identity(cfg) == "e2b9500453a956c8"
