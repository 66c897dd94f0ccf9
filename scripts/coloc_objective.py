"""Co-localisation's objective at known crops: the triplet loss (and its two distances) of
crops on the digits' own boxes, of blank crops off the canvas and of the identity (the whole
canvas), on one class's 100 training images, with the encoder's features as they are and scaled
to unit length. Which crops the loss prefers, whatever the optimiser does (docs/coloc.md).

    python scripts/coloc_objective.py [--data coloc_t] [--digits 3 7]

Needs the encoder run (task.encoder); trains it first if missing, like any coloc run.
"""

import argparse

import torch

from stnbench import geometry
from stnbench.cli import load_config
from stnbench.tasks import coloc


def objective(model, x: torch.Tensor, crops: torch.Tensor, rand: torch.Tensor, unit: bool):
    """The mean hinge over pairs, the mean first (positive) and second (negative) distances."""
    with torch.no_grad():
        a = model.features(geometry.warp(x, "attention", crops, (28, 28)), unit)
        q = model.features(geometry.warp(x, "attention", rand, (28, 28)), unit)
    pos, neg = torch.cdist(a, a).pow(2), (a - q).pow(2).sum(1, keepdim=True)
    pairs = ~torch.eye(len(x), dtype=torch.bool)
    return (pos - neg + 1).clamp_min(0)[pairs].mean(), pos[pairs].mean(), neg.mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="coloc_t")
    parser.add_argument("--digits", type=int, nargs="+", default=[3, 7])
    args = parser.parse_args()
    print("data,digit,crops,features,loss,positive,negative")
    for digit in args.digits:
        cfg = load_config(
            "stnbench_train", ["task=coloc", f"data={args.data}", f"data.digit={digit}"]
        )
        model = coloc.build_model(cfg, torch.device("cpu")).eval()
        x, box = coloc.splits(cfg, "cpu")["train"]
        n = len(x)
        crops = {"digit": coloc.frame(box),
                 "blank": torch.tensor([[1 / 3, 5.0, 5.0]]).expand(n, 3),  # off the canvas
                 "identity": torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3)}  # fmt: skip
        rand = coloc.random_crops(n, torch.Generator().manual_seed(1))
        for name, params in crops.items():
            for unit in (False, True):
                values = objective(model, x, params, rand, unit)
                shown = ",".join(f"{v.item():.3f}" for v in values)
                print(f"{args.data},{digit},{name},{'unit' if unit else 'raw'},{shown}")


if __name__ == "__main__":
    main()
