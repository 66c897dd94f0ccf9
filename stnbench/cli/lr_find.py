"""stnbench-lr-find: the learning-rate range test (stnbench.lr_find) on any training
configuration; the last line printed is ``suggested lr: <value>``."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from stnbench import config  # noqa: F401  (registers the schemas in Hydra's ConfigStore)
from stnbench.cli import run

PROG = "stnbench-lr-find"
RAISED: list[Exception] = []  # by the job, raised again by main() (Hydra would add a line first)


@hydra.main(config_path="pkg://stnbench.conf", config_name="stnbench_lr_find", version_base="1.3")
def app(cfg: DictConfig) -> None:
    from stnbench.lr_find import range_test

    out = Path(HydraConfig.get().runtime.output_dir)
    try:
        s = range_test(cfg, out)
    except Exception as e:
        RAISED.append(e)
        return
    where = os.path.relpath(out)
    print(f"{PROG}: {s['steps']} steps up to lr {s['stopped_lr']:.3g} -> {where}/lr_find.png")
    if s["collapse_lr"] is not None:
        print(f"the localisation net collapses from lr {s['collapse_lr']:.3g} "
              f"(the suggestion is taken below it)")  # fmt: skip
    if s["suggested_lr"] is None:
        print(f"{PROG}: error: no suggestion: the loss never fell below the untrained model's; "
              "start lower (lr_find.start)", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    print(f"suggested lr: {s['suggested_lr']:.3g}")


def main() -> int:
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach run(): one line each

    def body() -> None:
        app()
        if RAISED:
            raise RAISED[0]

    return run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
