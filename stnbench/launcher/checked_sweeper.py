"""hydra/sweeper=stnbench, stnbench-train's default: Hydra's basic sweeper, which first composes
every job of the sweep and checks its settings (stnbench.config.check), so that a bad value in
any job is refused before the sweep makes a folder (Hydra's own checks only composition, after
writing the sweep folder). Its config node is stnbench.config.CheckedSweeperConf.

``hydra.sweeper.grids`` (a list of ``key: values`` maps, as scikit-learn's ParameterGrid takes a
list of grids) makes the sweep the union of several products, each with ``params``: Table 1's
rows on R, RTS, P and E and other rows on TC, in one command. A value given on the command line
narrows every grid to it, and a grid that does not hold it is left out (``data=tc`` trains only
TC's rows)."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class CheckedSweeper(BasicSweeper):
    def __init__(self, max_batch_size=None, params=None, grids=None):
        super().__init__(max_batch_size, params)
        self.grids = grids or [{}]

    def sweep(self, arguments: list[str]):
        from stnbench.config import check

        loader = self.hydra_context.config_loader
        overrides = self.parser().parse_overrides(self._parse_config() + list(arguments))
        for batch in self.split_arguments(overrides, None):
            for job in batch:
                check(loader.load_sweep_config(self.config, list(job)))
        returns = super().sweep(arguments)
        from stnbench.cli.train import OUTCOMES, count_returns

        if not OUTCOMES:  # no job counted itself: they ran in another launcher's processes
            count_returns([r for batch in returns for r in batch])
        return returns

    def parser(self) -> OverridesParser:
        return OverridesParser.create(config_loader=self.hydra_context.config_loader)

    def split_arguments(self, overrides, max_batch_size) -> list[list[list[str]]]:
        return expand(self.grids, overrides, max_batch_size)

    def validate_batch_is_legal(self, batch) -> None:
        """Hydra composes every job of a batch here, once more than the launcher does; sweep()
        above composed and checked them all before the first, so not again (it saved 0.1-0.2 s
        a job)."""


def expand(grids: list[dict], overrides, max_batch_size=None) -> list[list[list[str]]]:
    """Hydra's batches of jobs (each a list of ``key=value``) for parsed overrides, grid by
    grid: the grid's values first, so that the overrides replace them, then only the jobs whose
    values the grid holds, each job once."""
    jobs = []
    for grid in grids:
        own = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in grid.items()])
        held = {o.get_key_element(): set(values(o)) for o in own}
        for job in BasicSweeper.split_arguments([*own, *overrides], None)[0]:
            pairs = dict(item.split("=", 1) for item in job)
            if all(pairs[key] in allowed for key, allowed in held.items()) and job not in jobs:
                jobs.append(job)
    size = max_batch_size or max(len(jobs), 1)
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def values(override) -> list[str]:
    """The values an override gives its key, as the strings a job's ``key=value`` holds."""
    if override.is_discrete_sweep():
        return list(override.sweep_string_iterator())
    return [override.get_value_element_as_str()]
