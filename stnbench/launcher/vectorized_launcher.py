"""hydra/launcher=vectorized: the jobs of a sweep that differ only in seed and optimiser
settings train as one batched model in one process (stnbench.vectorized); the others run one
after another, as with Hydra's basic launcher. Every job gets its own folder, .hydra/ config,
train.log, TensorBoard events, checkpoint and metrics.json, as a separate run would."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
JOB_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's job log format


@dataclass
class VectorizedLauncherConf:
    _target_: str = "hydra_plugins.stnbench_launcher.vectorized_launcher.VectorizedLauncher"
    max_group: int = 16  # runs trained together at most (memory grows with it)


ConfigStore.instance().store(group="hydra/launcher", name="vectorized", node=VectorizedLauncherConf)


class _RunLog(logging.Filter):
    """Passes the records of one run of a group (its lines carry its tag or its folder)."""

    def __init__(self, marks: tuple[str, ...]):
        super().__init__()
        self.marks = marks

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return any(mark in message for mark in self.marks)


class VectorizedLauncher(Launcher):
    def __init__(self, max_group: int = 16) -> None:
        super().__init__()
        self.max_group = max_group
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _job_config(self, overrides: Sequence[str], idx: int) -> DictConfig:
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def _run(self, cfg: DictConfig, task_function) -> JobReturn:
        return run_job(
            hydra_context=self.hydra_context,
            task_function=task_function,
            config=cfg,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        from stnbench.vectorized import group_key

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            configs.append(self._job_config(overrides, idx))
        groups: dict[str, list[int]] = {}
        for i, cfg in enumerate(configs):
            groups.setdefault(group_key(cfg), []).append(i)
        chunks = []
        for members in groups.values():
            chunks += [
                members[j : j + self.max_group] for j in range(0, len(members), self.max_group)
            ]
        log.info(
            "Launching %d jobs as %d vectorised groups (sizes %s)",
            len(configs),
            len(chunks),
            ", ".join(str(len(c)) for c in chunks),
        )
        returns: list[JobReturn | None] = [None] * len(configs)
        for chunk in chunks:
            if len(chunk) == 1:
                returns[chunk[0]] = self._run(configs[chunk[0]], self.task_function)
            else:
                for i, ret in zip(chunk, self._group([configs[i] for i in chunk]), strict=True):
                    returns[i] = ret
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns

    def _group(self, configs: list[DictConfig]) -> list[JobReturn]:
        """Set up every job's folder as Hydra does, then train them together."""
        from stnbench.cli.train import OUTCOMES
        from stnbench.train import record_failure
        from stnbench.vectorized import train_group

        registered = []

        def register(task_cfg: DictConfig) -> None:
            hc = HydraConfig.get()
            registered.append((task_cfg, Path(hc.runtime.output_dir), hc.job.name))

        returns = [self._run(cfg, register) for cfg in configs]
        for ret in returns:
            _ = ret.return_value  # a job whose folder could not be set up raises here
        cfgs, outs, names = zip(*registered, strict=True)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        tags = [
            f"[{out.relative_to(sweep_dir) if out.is_relative_to(sweep_dir) else out}] "
            for out in outs
        ]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        handlers = []
        root = logging.getLogger()
        for out, tag, name in zip(outs, tags, names, strict=True):
            handler = logging.FileHandler(out / f"{name}.log")
            handler.setFormatter(logging.Formatter(JOB_FORMAT))
            handler.addFilter(_RunLog((tag, str(out))))
            root.addHandler(handler)
            handlers.append(handler)
        log.info("training %d runs as one batched model", len(cfgs))
        try:
            results = train_group(list(cfgs), list(outs), tags)
        except Exception as e:  # the group's crash is every member's; the sweep goes on
            log.exception("a vectorised group failed; recorded in each run's metrics.json")
            results = [record_failure(c, o, e) for c, o in zip(cfgs, outs, strict=True)]
        finally:
            for handler in handlers:
                root.removeHandler(handler)
                handler.close()
        for ret, metrics in zip(returns, results, strict=True):
            ret.return_value, ret.status = metrics, JobStatus.COMPLETED
            OUTCOMES[metrics["status"]] += 1
        return returns
