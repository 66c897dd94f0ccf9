"""What the command-line entry points share: config composition and one-line errors."""

import logging
import sys
from collections.abc import Callable

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from stnbench.errors import StnbenchError, describe


def load_config(name: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """Compose a primary config from the installed stnbench.conf with Hydra overrides and check
    it (stnbench.config.check); with Hydra's own node, ``hydra``, when ``with_hydra``."""
    from hydra.core.global_hydra import GlobalHydra

    from stnbench import config  # its schemas in Hydra's ConfigStore (it imports torch)

    if GlobalHydra.instance().is_initialized():  # inside a command's run (task=coloc's encoder)
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)
    else:
        with initialize_config_module(config_module="stnbench.conf", version_base="1.3"):
            cfg = compose(config_name=name, overrides=overrides, return_hydra_config=with_hydra)
    config.check(cfg)
    return cfg


def run(prog: str, fn: Callable[[], object]) -> int:
    """Run a command body; bad input becomes `prog: error: ...` on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(message)s")
    try:
        fn()
    except (StnbenchError, HydraException, OmegaConfBaseException) as e:
        print(f"{prog}: error: {describe(e)}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (stnbench.train.Interrupted in the loop)
        print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only folder: what to free or fix, in one line
        where = f" writing {e.filename}" if e.filename else ""
        resumes = " (a run resumes from its last checkpoint)" if prog == "stnbench-train" else ""
        print(f"{prog}: error: {e.strerror or e}{where}; fix it and rerun the same "
              f"command{resumes}", file=sys.stderr)  # fmt: skip
        return 1
    except AssertionError as e:  # OmegaConf's, for a key set under a null node
        if "Unexpected type for root: NoneType" not in str(e):
            raise
        print(f"{prog}: error: {NULL_PARENT}", file=sys.stderr)
        return 2
    return 0


NULL_PARENT = (
    "an override sets a key under a setting that is null (e.g. data.recipe.canvas with "
    "data=plain, which has no recipe); set it with a dataset that has one"
)
