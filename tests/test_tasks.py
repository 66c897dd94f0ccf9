"""The task layer (stnbench.tasks): every registered task trains a few steps and reports its
metric well clear of chance; classification's loss and metric are torch's."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from stnbench import rundir, tasks
from stnbench.cli import load_config
from stnbench.errors import StnbenchError
from stnbench.train import train

# each task's few steps: a small classifier on plain MNIST; one class's co-localisation with an
# encoder trained for 150 steps in the test's folder and the centring term, without which it
# does not learn at a test's budget (docs/coloc.md; measured: 62.5% test iou50 at 300 steps)
ARGS = {
    "classify": ["data=plain", "model=fcn", "data.train_size=3000", "train.batch_size=64",
                 "train.steps=60", "train.val_every=30", "train.val_size=500"],
    "coloc": ["data.digit=1", "task.images=40", "train.steps=300", "train.val_every=100",
              "task.centring=1",
              "task.encoder_args=['data=plain','row=cnn','train.steps=150','train.batch_size=64',"
              "'optim.lr=0.03','schedule=cosine','train.val_every=150','train.val_size=500']"],
}  # fmt: skip


SLOW = {"coloc"}  # its encoder trains first


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)) for n in tasks.TASKS]
)
def test_every_task_trains_a_few_steps_and_reports_its_metric(name, mnist_root, tmp_path):
    task = tasks.get(name)
    args = [f"task={name}", *ARGS[name], f"task.encoder={tmp_path / 'encoder'}"]
    m = train(load_config("stnbench_train", args), tmp_path / "run")
    metric, chance = task.METRIC, task.METRIC.chance
    assert m["status"] == "ok" and m["steps"] > 0 and m["params"] > 0
    for split in ("test", "val", "best_test"):  # well clear of chance (coloc's identity: 0%)
        value = m[f"{split}_{metric.name}"]
        assert 0 <= value <= 100
        assert value < chance / 2 if metric.lower_is_better else value > chance + 30
    assert m["digest"] == rundir.digest(m) and rundir.disagreement(m) is None


def test_classification_is_cross_entropy_and_the_error_of_the_argmax():
    torch.manual_seed(0)
    x, y = torch.randn(100, 7), torch.randint(0, 7, (100,))
    model = torch.nn.Identity()
    classify = tasks.get("classify")
    cfg = OmegaConf.create({"train": {"label_smoothing": 0.1}})
    loss, wrong = classify.loss(model, x, y, cfg)
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
    assert cfg["task"]["name"] == "classify" and "task" not in recorded(cfg)
    assert "digit" not in recorded(cfg)["data"]  # nor data.digit, left at its default (null)
    assert identity(cfg) == "e2b9500453a956c8"
