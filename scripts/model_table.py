"""Markdown table of every model's learnable parameters (and computed width) per canvas.

    python scripts/model_table.py [--budget 400000] > table.md

docs/models.md holds its output for the default budget.
"""

import argparse

from stnbench import geometry
from stnbench.models import BUDGET, MODELS, STModel, build, count, is_st

CANVASES = (28, 42, 60)
ROWS = [
    (f"{arch.label} {k}" if k else arch.label, m, k)
    for m, arch in MODELS.items()
    for k in (geometry.KINDS if is_st(m) else [None])
]


def width(net) -> int:
    classifier = net.classifier if isinstance(net, STModel) else net
    first = next(m for m in classifier if hasattr(m, "weight"))
    return first.weight.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=BUDGET)
    args = ap.parse_args()
    print("| model | " + " | ".join(f"{c}x{c}: params (width)" for c in CANVASES) + " |")
    print("|---|" + "---|" * len(CANVASES))
    for label, model, kind in ROWS:
        cells = []
        for c in CANVASES:
            net = build(model, kind, c, budget=args.budget)
            cells.append(f"{count(net):,} ({width(net)})")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
