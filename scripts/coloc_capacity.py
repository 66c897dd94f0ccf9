"""What co-localisation's localisation net can learn when told the answer: the paper's net
(coloc.Crops) trained to put its crop's centre on each training image's digit (squared error on
the boxes, which the task itself never reads), then scored by iou50 on the training images and on
the held-out validation images at the digit's scale. It separates the objective's path from the
net's capacity: a net that finds 100% of its training images but few held-out ones memorises
its 100 images rather than learning to find the digit (docs/coloc.md, "What limits TC").

    python scripts/coloc_capacity.py [--data coloc_tc] [--digits 1 7] [--steps 1500]

Needs the encoder run (task.encoder), as any coloc model does; trains it first if missing.
"""

import argparse

import torch

from stnbench.cli import load_config
from stnbench.tasks import coloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="coloc_tc")
    parser.add_argument("--digits", type=int, nargs="+", default=[1, 7])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("data,digit,seed,steps,train_iou50,val_iou50")
    for digit in args.digits:
        overrides = [f"data={args.data}", f"data.digit={digit}", f"seed={args.seed}"]
        cfg = load_config("stnbench_train", ["task=coloc", *overrides])
        t = coloc.build_model(cfg, torch.device("cpu")).transformer
        t.ceiling.fill_(cfg.task.scale_max)
        split = coloc.splits(cfg, "cpu")
        x, box = split["train"]
        target = coloc.frame(box)[:, 1:]  # the digits' centres
        opt = torch.optim.Adam(t.parameters(), cfg.optim.lr)
        gen = torch.Generator().manual_seed(args.seed)
        for _ in range(args.steps):
            idx = torch.randperm(len(x), generator=gen)[: cfg.train.batch_size]
            loss = (t.params(x[idx])[:, 1:] - target[idx]).pow(2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        scores = []
        with torch.no_grad():
            for name in ("train", "val"):
                images, boxes = split[name]
                params = t.params(images)
                params[:, 0] = coloc.frame(boxes)[:, 0]  # the digit's scale: position alone
                scores.append(100 * coloc.found(params, boxes).float().mean().item())
        print(f"{args.data},{digit},{args.seed},{args.steps},{scores[0]:.0f},{scores[1]:.0f}")


if __name__ == "__main__":
    main()
