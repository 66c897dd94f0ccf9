"""Co-localisation (stnbench.tasks.coloc): the digits' boxes, IoU, the score of known crops, the
bounded crops and their zoom, the loss, the encoder's features and checks, bad input, the
per-class table, the centring term, and a search's sweep through stnbench-report and
stnbench-analyse boxes. (tests/test_tasks.py has a short run that finds the digits, with the
centring term: without it, at a test's budget it does not, docs/coloc.md.)"""

import json

import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_sweeps import cli

from stnbench.cli import load_config
from stnbench.errors import StnbenchError
from stnbench.tasks import coloc


def config(*args: str):
    return load_config("stnbench_train", ["task=coloc", *args])


@pytest.mark.parametrize("name", ["coloc_t", "coloc_tc"])
def test_each_box_holds_its_digits_ink_and_is_the_digits_frame(name, mnist_root):
    from stnbench import data
    from stnbench.config import recipe_of
    from stnbench.distortions import Plan, render

    cfg = config(f"data={name}", "data.digit=3", "task.images=20")
    d = coloc.splits(cfg, torch.device("cpu"))
    assert set(d) == {"train", "val", "test"}
    centres = (torch.arange(84) + 0.5) / 42 - 1  # the pixels' centres, normalised
    for split, (x, box) in d.items():
        assert x.shape == (20, 1, 84, 84) and box.shape == (20, 4)
        # the frame is the 28x28 digit, placed wholly inside the canvas
        assert torch.allclose(box[:, 2:] - box[:, :2], torch.full((20, 2), 2 * 28 / 84), atol=1e-5)
        assert (box >= -1 - 1e-6).all() and (box <= 1 + 1e-6).all()
        # every pixel of the digit's ink lies inside: the same draw rendered without clutter
        draw = data.fixed_draw(name, split, None, 0, recipe_of(cfg))
        digit = Plan(draw.plans[0].kind, draw.plans[0].params, None)
        clean = render(draw.recipe, digit, draw.digits[0], coloc.members(cfg, split))
        if name == "coloc_t":
            assert torch.equal(clean, x)
        else:  # clutter added elsewhere
            assert (x - clean).abs().sum() > 0 and (x >= clean - 1e-6).all()
        for i in range(20):
            ys, xs = (clean[i, 0] > 0.05).nonzero(as_tuple=True)
            assert len(xs) > 20
            assert centres[xs].min() >= box[i, 0] and centres[xs].max() <= box[i, 2]
            assert centres[ys].min() >= box[i, 1] and centres[ys].max() <= box[i, 3]


def test_iou_of_hand_made_boxes():
    a = torch.tensor([[0.0, 0, 2, 2]] * 4)
    b = torch.tensor([[0.0, 0, 2, 2], [1, 0, 3, 2], [0, 0, 1, 1], [5, 5, 6, 6]])
    assert coloc.iou(a, b).tolist() == pytest.approx([1.0, 1 / 3, 0.25, 0.0])
    assert coloc.iou(b, a).tolist() == pytest.approx([1.0, 1 / 3, 0.25, 0.0])


def test_the_true_crop_scores_100_and_the_identity_what_the_arithmetic_says(mnist_root):
    box = coloc.splits(config("data.digit=7", "task.images=30"), "cpu")["test"][1]
    centre, half = (box[:, :2] + box[:, 2:]) / 2, (box[:, 2:] - box[:, :2]) / 2
    true = torch.cat([half[:, :1], centre], dim=1)  # (s, tx, ty) of the digit's own frame
    assert coloc.found(true, box).all() and torch.equal(coloc.frame(box), true)
    torch.testing.assert_close(coloc.crop_boxes(coloc.frame(box)), box)  # frame's round trip
    identity = torch.tensor([[1.0, 0, 0]]).expand(30, 3)  # the whole canvas
    assert coloc.iou(coloc.crop_boxes(identity), box).tolist() == pytest.approx([1 / 9] * 30)
    assert not coloc.found(identity, box).any()  # 1/9 < 0.5: the identity scores 0%
    # a crop of the digit's size half a digit off: IoU (14 x 28) / (2 x 28^2 - 14 x 28) = 1/3
    off = true + torch.tensor([0.0, 14 / 42, 0])
    assert coloc.iou(coloc.crop_boxes(off), box).tolist() == pytest.approx([1 / 3] * 30, abs=1e-5)


def test_random_crops_lie_inside_the_canvas_and_have_the_digits_size():
    crops = coloc.random_crops(1000, torch.Generator().manual_seed(0))
    boxes = coloc.crop_boxes(crops)
    assert (boxes >= -1 - 1e-6).all() and (boxes <= 1 + 1e-6).all()
    assert torch.allclose(boxes[:, 2:] - boxes[:, :2], torch.full((1000, 2), 2 / 3))
    assert boxes[:, 0].min() < -0.9 and boxes[:, 2].max() > 0.9  # all the way to the edges


def test_the_crops_start_large_on_the_centre_and_stay_on_the_canvas_within_their_scales():
    t = coloc.Crops(84, scale_min=0.28, start=0.9)
    x = torch.rand(50, 1, 84, 84)
    assert torch.allclose(t.params(x), torch.tensor([[0.9, 0.0, 0.0]]).expand(50, 3), atol=1e-6)
    z = torch.linspace(-30, 30, 13)  # the regression layer's outputs, far from the start both ways
    with torch.no_grad():
        for top in (1.0, 0.6, 0.42):
            t.ceiling.fill_(top)
            p = []
            for b in torch.cartesian_prod(z, z, z):  # the weights are 0: params from the bias
                t.regress.bias.copy_(b)
                p.append(t.params(x[:1]))
            p = torch.cat(p)
            assert (p[:, 0] >= 0.28).all() and (p[:, 0] <= top + 1e-6).all()
            assert p[:, 0].min() < 0.29 and p[:, 0].max() > top - 0.01  # reaching both bounds
            boxes = coloc.crop_boxes(p)
            assert (boxes >= -1 - 1e-6).all() and (boxes <= 1 + 1e-6).all()
            assert boxes[:, 0].min() < -0.99 and boxes[:, 2].max() > 0.99  # to the edges
    assert "ceiling" in t.state_dict()  # a checkpoint holds it: a resume goes on at its zoom


def test_the_ceiling_falls_from_the_canvas_to_scale_max_over_zoom_then_holds():
    cfg = config("train.steps=1000", "task.zoom=0.3", "task.scale_max=0.4")
    at = [coloc.ceiling(cfg, s) for s in (0, 150, 300, 301, 999)]
    assert at == pytest.approx([1.0, 0.7, 0.4, 0.4, 0.4])
    stream = coloc.batches(cfg, {"train": (torch.zeros(5, 1, 84, 84), None)}, 150)
    assert next(stream)[1][1] == pytest.approx(0.7)  # each step's batch carries its ceiling


@pytest.mark.parametrize(
    "args, line",
    [
        (["task.scale_max=0.2"], r"^task.scale_max must be >= task.scale_min \(0.28\); got 0.2$"),
        (["task.start=0.25"], r"^task.start must be > task.scale_min \(0.28\); got 0.25$"),
        (["task.start=1"], r"^task.start must be a number in \(0, 1\); got 1.0$"),
        (["task.zoom=0"], r"^task.zoom must be a number in \(0, 1\]; got 0"),
    ],
)
def test_crop_scales_that_cannot_hold_are_one_line(args, line):
    with pytest.raises(StnbenchError, match=line):
        config(*args)


def test_a_class_outside_0_9_is_one_line():
    with pytest.raises(StnbenchError, match=r"^data.digit must be an integer in \[0, 9\] or null"):
        config("data.digit=10")


def test_coloc_needs_a_class_and_a_placed_recipe_and_classify_no_class():
    """Each checked as the config is composed, so a sweep stops before any job trains."""
    with pytest.raises(StnbenchError, match=r"^data.digit: task=coloc trains on one class"):
        config("data.digit=null")
    with pytest.raises(StnbenchError, match=r"^data=r: task=coloc needs a placed one-digit"):
        config("data=r")
    with pytest.raises(StnbenchError, match=r"^data.digit=3: task=classify trains on every class"):
        load_config("stnbench_train", ["data.digit=3"])


def finished_run(folder, model="cnn", status="ok"):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": status, "model": model}))


def test_an_encoder_checkpoint_missing_or_of_another_architecture_is_one_line(tmp_path):
    enc_cfg = load_config("stnbench_train", ["data=plain", "row=cnn"])
    finished_run(tmp_path / "gone")
    with pytest.raises(StnbenchError, match=r"^task.encoder: .*gone/checkpoint.pt is missing"):
        coloc.load_encoder(tmp_path / "gone", enc_cfg, "cpu")
    finished_run(tmp_path / "st", model="st_fcn")
    with pytest.raises(StnbenchError, match=r"^task.encoder: .*st holds a st_fcn run that ended"):
        coloc.load_encoder(tmp_path / "st", enc_cfg, "cpu")
    finished_run(tmp_path / "wide")  # a CNN's run, but of another width
    other = load_config("stnbench_train", ["data=plain", "row=cnn", "model.budget=100000"])
    net = coloc.models.from_config(OmegaConf.to_container(other.model), None, 28, 10, 1)
    torch.save({"model": net.state_dict()}, tmp_path / "wide" / "checkpoint.pt")
    with pytest.raises(StnbenchError, match=r"^task.encoder: .*is not a CNN on 28x28 MNIST as"):
        coloc.load_encoder(tmp_path / "wide", enc_cfg, "cpu")


def test_the_triplet_loss_is_the_papers_hinge_over_pairs():
    """On features made by hand: pairs n != m, max(0, d(a_n, a_m) - d(a_n, q_n) + margin)."""

    class Stub(torch.nn.Module):  # crops are the features; the transformer's output is fixed
        def __init__(self, a):
            super().__init__()
            self.a = a

        def forward(self, x):
            return self.a, torch.zeros(len(x), 3)

        def features(self, crops):
            return crops.flatten(1)[:, :1]  # the first pixel: a_n, or the blank crop's 0

    a = torch.tensor([[0.0], [1.0], [3.0]]).view(3, 1, 1, 1)
    x = torch.zeros(3, 1, 84, 84)  # the random crops of a blank image: features 0
    value, _ = coloc.triplet(Stub(a), x, coloc.random_crops(3, torch.Generator()), 1.0)
    d = lambda u, v: (u - v) ** 2  # noqa: E731
    flat = a.flatten().tolist()
    want = [max(0, d(flat[n], flat[m]) - d(flat[n], 0) + 1) for n in range(3) for m in range(3)
            if n != m]  # fmt: skip
    assert value.item() == pytest.approx(sum(want) / len(want))


def test_the_centring_term_is_the_squared_distance_of_the_ink_from_the_crops_centre():
    crop = torch.zeros(2, 1, 28, 28)
    crop[0, 0, 13:15, 13:15] = 1  # about the centre: the ink's centre at 0
    crop[1, 0, 13:15, 20:22] = 1  # 7 px right: pixels 20, 21's centres 13/28, 15/28 -> 0.5
    assert coloc.off_centre(crop[:1]).item() == pytest.approx(0, abs=1e-7)
    assert coloc.off_centre(crop[1:]).item() == pytest.approx(0.25)
    assert coloc.off_centre(crop).item() == pytest.approx(0.125)  # the mean over crops
    torch.manual_seed(0)
    model = coloc.CoLocaliser(coloc.SpatialTransformer("coloc", "attention", 84, out_size=28),
                              coloc.models.build("cnn", None, 28))  # fmt: skip
    x, rand = torch.rand(4, 1, 84, 84), coloc.random_crops(4, torch.Generator())
    plain, with_term = (coloc.triplet(model, x, rand, 1.0, w)[0] for w in (0.0, 2.0))
    assert with_term.item() == pytest.approx(
        plain.item() + 2 * coloc.off_centre(model(x)[0]).item()
    )


@pytest.mark.parametrize(("px", "found"), [((6, -3), 100), ((18, -9), 0)])
def test_offsets_measure_a_known_shift_of_the_true_crops(px, found):
    """stnbench-analyse boxes' offsets: crops on the digits' own frames, all moved by px pixels
    (x right, y down), show that shift with no spread, and score 100% with it removed. A 28 px
    square moved (6, 3) px has IoU (22 x 25) / (2 x 784 - 22 x 25) = 0.54; by (18, 9), 0.11."""
    from types import SimpleNamespace

    from stnbench.analysis import offsets

    box = torch.tensor([[-0.5, -0.5, 1 / 6, 1 / 6], [0.0, 0.1, 2 / 3, 23 / 30]])  # sides 2/3
    crops = coloc.frame(box) + torch.tensor([0.0, px[0] / 42, px[1] / 42])  # 42 px a unit
    model = SimpleNamespace(transformer=SimpleNamespace(params=lambda x: crops))
    got = offsets(model, torch.zeros(2, 1, 84, 84), box)
    assert (got["dx"], got["dy"]) == (
        pytest.approx(px[0], abs=1e-4),
        pytest.approx(px[1], abs=1e-4),
    )
    assert got["sd_dx"] < 1e-4 and got["sd_dy"] < 1e-4 and got["scale"] == pytest.approx(1 / 3)
    assert got["iou50"] == found and got["iou50_offset_removed"] == 100


def test_runs_with_the_centring_term_are_a_row_of_their_own():
    runs = pd.DataFrame({"data": ["coloc_t"] * 3, "digit": [5.0] * 3, "lr": [1e-3] * 3,
                         "status": ["ok"] * 3, "centring": [None, 0.0, 1.0],
                         "test_iou50": [80.0, 90.0, 99.0],
                         "val_iou50": [80.0, 90.0, 99.0]})  # fmt: skip
    frame, text = coloc.table(runs)  # None: a run from before the setting, which trained without
    assert frame["5"].tolist() == [85.0, 99.0] and frame.centring.fillna(0).tolist() == [0, 1]
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:4]] == ["T", "T, centring 1"]
    assert "centring" not in coloc.table(runs.drop(columns="centring"))[0]  # a committed table's


def test_the_encoders_features_are_its_two_pools_and_logits_at_unit_length():
    torch.manual_seed(0)
    encoder = coloc.models.build("cnn", None, 28)
    model = coloc.CoLocaliser(coloc.SpatialTransformer("coloc", "attention", 84, out_size=28),
                              encoder)  # fmt: skip
    crops = torch.rand(5, 1, 28, 28)
    e = model.features(crops)
    assert torch.allclose(e.norm(dim=1), torch.ones(5))
    h = [crops]
    for layer in encoder:
        h.append(layer(h[-1]))
    raw = torch.cat([h[i + 1].flatten(1) for i in coloc.FEATURES], dim=1)
    assert torch.allclose(e, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen
    assert model.train().encoder.training is False


def test_the_per_class_table_pools_seeds_and_counts_the_runs_that_did_not_end_ok():
    import pandas as pd

    runs = pd.DataFrame({
        "data": ["coloc_t"] * 4 + ["coloc_tc"],
        "digit": [3.0, 3.0, 4.0, 4.0, 3.0],
        "status": ["ok", "ok", "ok", "collapsed", "unfinished"],
        "test_iou50": [90.0, 100.0, 80.0, 0.0, None],
    })  # fmt: skip
    frame, text = coloc.table(runs)
    t = frame.set_index("data")
    assert (t.loc["coloc_t", "3"], t.loc["coloc_t", "3 n"], t.loc["coloc_t", "4 n"]) == (95.0, 2, 1)
    assert t.loc["coloc_tc", "3 n"] == 0 and t.loc["coloc_t", "paper"] == "100"
    lines = text.splitlines()
    assert "| T " in lines[2] and "95.0 ± 7.1 (2)" in lines[2]
    assert "80.0 (1) [1 collapsed]" in lines[2]
    assert "no ok run [1 unfinished]" in lines[3] and "75-93" in lines[3]
    assert coloc.table(runs.drop(columns="test_iou50").assign(status="unfinished"))[0].shape[0] == 2


def test_a_higher_is_better_metric_improves_upwards():
    m = coloc.METRIC
    assert m.better(10.0, None) and m.better(10.0, 5.0) and not m.better(5.0, 10.0)
    assert not m.better(0.0, 0.0)  # at the collapse threshold is near chance, not better
    from stnbench.tasks import classify

    assert classify.METRIC.better(1.0, 2.0) and not classify.METRIC.better(2.0, 1.0)


def test_a_set_of_one_image_and_classifications_collapse_at_0_are_one_line():
    with pytest.raises(StnbenchError, match=r"^task.images must be an integer >= 2"):
        config("task.images=1")
    with pytest.raises(StnbenchError, match=r"^train.collapse.error must be above 0 for task=cl"):
        load_config("stnbench_train", ["train.collapse.error=0"])
    assert config().train.collapse.error == 0  # coloc's: iou50 at or below 0%


def test_a_class_with_runs_at_several_lrs_reports_the_lr_best_on_validation():
    runs = pd.DataFrame({"data": ["coloc_t"] * 4, "digit": [2.0] * 4,
                         "lr": [1e-3, 1e-3, 1e-2, 1e-2], "status": ["ok", "ok", "ok", "diverged"],
                         "val_iou50": [40.0, 50.0, 90.0, None],
                         "test_iou50": [41.0, 51.0, 88.0, None]})  # fmt: skip
    frame, text = coloc.table(runs)  # val: 1e-3 45, 1e-2 (90 + 0) / 2 = 45: the tie's smaller lr
    assert frame.loc[0, "2 lr"] == 1e-3 and frame.loc[0, "2"] == 46.0
    assert "46.0 ± 7.1 (2) @ lr 0.001" in text
    runs.loc[3, "status"], runs.loc[3, "val_iou50"] = "ok", 80.0  # now 1e-2: 85
    frame, text = coloc.table(runs)
    assert frame.loc[0, "2 lr"] == 1e-2 and "@ lr 0.01" in text and "1 diverged" not in text


@pytest.mark.slow
def test_a_coloc_search_goes_through_the_report_and_the_boxes(bin_dir, tmp_path, mnist_root):
    """A co-localisation sweep through what a researcher runs on one: an Optuna lr search
    (hparams_search=lr, maximising best_val_iou50), stnbench-report (the per-class table, the
    runs, the curves) and stnbench-analyse boxes (the PNG and the offsets CSV), read back."""
    encoder = ("task.encoder_args=['data=plain','row=cnn','train.steps=100',"
               "'train.batch_size=64','optim.lr=0.03','schedule=cosine','train.val_every=100',"
               "'train.val_size=500']")  # fmt: skip
    args = ["-m", "hparams_search=lr", "task=coloc", "data.digit=1", "task.images=20",
            "train.steps=20", "train.val_every=10", "hydra.sweeper.n_trials=2",
            f"task.encoder={tmp_path / 'encoder'}", encoder]  # fmt: skip
    r = cli(bin_dir, tmp_path, "stnbench-train", *args, timeout=900)
    assert r.returncode == 0, r.stderr
    (results,) = (tmp_path / "outputs").rglob("optimization_results.yaml")
    sweep = results.parent
    trials = [json.loads(p.read_text()) for p in sweep.rglob("metrics.json")]
    assert len(trials) == 2 and all(t["searched"] and t["task"] == "coloc" for t in trials)
    scores = [t["best_val_iou50"] if t["status"] == "ok" else 0.0 for t in trials]
    assert yaml.safe_load(results.read_text())["best_value"] == max(scores)  # maximised

    out = tmp_path / "report"
    r = cli(bin_dir, tmp_path, "stnbench-report", str(sweep), "--out", str(out))
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(out / "table.csv")
    best = max(trials, key=lambda t: (t["val_iou50"] if t["status"] != "diverged" else 0, -t["lr"]))
    assert table["data"].tolist() == ["coloc_t"] and table.loc[0, "1 lr"] == best["lr"]
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and set(runs.digit) == {1} and "test_iou50" in runs
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 2 * 2 and (out / "curves.png").stat().st_size > 0  # 2 validations each

    png, csv = tmp_path / "boxes.png", tmp_path / "offsets.csv"
    r = cli(bin_dir, tmp_path, "stnbench-analyse", "boxes", str(sweep), "--png", str(png),
            "--csv", str(csv))  # fmt: skip
    assert r.returncode == 0, r.stderr
    offsets = pd.read_csv(csv)
    assert len(offsets) == 2 * 3 and set(offsets.split) == {"train", "val", "test"}
    assert offsets.iou50.between(0, 100).all() and (offsets.scale > 0).all()
    assert png.stat().st_size > 0
