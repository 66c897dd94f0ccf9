"""hydra/sweeper=stnbench, stnbench-train's default: Hydra's basic sweeper, which first composes
every job of the sweep and checks its settings (stnbench.config.check), so that a bad value in
any job is refused before the sweep makes a folder (Hydra's own checks only composition, after
writing the sweep folder). Its config node is stnbench.config.CheckedSweeperConf."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class CheckedSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]):
        from stnbench.config import check

        loader = self.hydra_context.config_loader
        parser = OverridesParser.create(config_loader=loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        for batch in self.split_arguments(overrides, None):
            for job in batch:
                check(loader.load_sweep_config(self.config, list(job)))
        returns = super().sweep(arguments)
        from stnbench.cli.train import OUTCOMES, count_returns

        if not OUTCOMES:  # no job counted itself: they ran in another launcher's processes
            count_returns([r for batch in returns for r in batch])
        return returns

    def validate_batch_is_legal(self, batch) -> None:
        """Hydra composes every job of a batch here, once more than the launcher does; sweep()
        above composed and checked them all before the first, so not again (it saved 0.1-0.2 s
        a job)."""
