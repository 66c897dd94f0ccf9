"""hydra/launcher=stnbench, stnbench-train's default; what it does for the user, and measured
against Hydra's launchers: docs/sweeps.md, "Launchers". Without a GPU, a sweep's jobs run in
joblib's worker processes, one per core (``n_jobs``; fewer where memory would not hold them at
2 GiB each), each with cores // workers threads; the jobs left over run next in fewer workers
with more threads each, a single one in this process. With a GPU, or one job, one after another
in this process, as Hydra's sequential launcher.

Ctrl-C or SIGTERM marks the sweep stopped (a file the workers see): every running job saves its
checkpoint at its next step and returns, and no other starts. The workers ignore the signals
themselves outside a training loop, so a terminal's Ctrl-C, which reaches them too, cannot kill
one while it starts or evaluates (joblib would then kill the others mid-step). Its config node
is stnbench.config.LocalLauncherConf."""

import logging
import os
import signal
import tempfile
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.singleton import Singleton
from hydra.core.utils import JobStatus, configure_log, setup_globals
from hydra.plugins.launcher import Launcher

log = logging.getLogger(__name__)
WORKER_MEMORY = 2 * 2**30  # a worker's resident memory, at most (1.5 GiB measured, data=r)
STOP: Path | None = None  # in a worker: the file whose existence stops the sweep
# what a job of a stopped sweep returns (stnbench.cli.train.job), so that its last line can say
# how many ended, saved their checkpoints mid-run or never started
STOPPED, NOT_STARTED = "stopped: checkpoint saved", "not started"


def default_jobs() -> int:
    """Jobs at once: one per core on a CPU-only machine, as many as its memory holds; one with
    a GPU (it holds one run)."""
    import joblib
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(joblib.cpu_count(), memory() // WORKER_MEMORY))


def memory() -> int:
    """The memory this process may use in bytes: the machine's, or its cgroup's limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = Path("/sys/fs/cgroup/memory.max")
    text = limit.read_text().strip() if limit.exists() else "max"
    return min(total, int(text)) if text.isdigit() else total


def worker_start(stop_file: str) -> None:
    """Each worker, once: where the stop mark will be; signals wait for a training loop."""
    global STOP
    STOP = Path(stop_file)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def stop_mark() -> Path:
    """The file that marks this process's sweep stopped (what ``STOP`` is in its workers)."""
    return Path(tempfile.gettempdir()) / f"stnbench-sweep-{os.getpid()}.stop"


def stop_requested() -> bool:
    """Whether this process is a worker of a sweep that was stopped."""
    return STOP is not None and STOP.exists()


class LocalLauncher(Launcher):
    def __init__(self, n_jobs: int | None = None) -> None:
        from stnbench.errors import StnbenchError

        if n_jobs is not None and n_jobs < 1:
            expected = "an integer >= 1 or null"
            raise StnbenchError(f"hydra.launcher.n_jobs must be {expected}; got {n_jobs}")
        self.n_jobs = n_jobs

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides, initial_job_idx):
        jobs, first = list(job_overrides), initial_job_idx
        workers = self.n_jobs or default_jobs()
        if workers == 1 or len(jobs) == 1:
            return self.one_by_one(jobs, first)
        full = len(jobs) - len(jobs) % workers  # rounds that fill every worker
        returns = self.side_by_side(jobs[:full], first, workers) if full else []
        tail = jobs[full:]
        if len(tail) == 1:
            returns += self.one_by_one(tail, first + full)
        elif tail:
            returns += self.side_by_side(tail, first + full, len(tail))
        return returns

    def one_by_one(self, jobs, first):
        """Hydra's sequential launcher, in this process; its jobs count themselves."""
        sequential = BasicLauncher()
        sequential.setup(hydra_context=self.hydra_context, task_function=self.task_function,
                         config=self.config)  # fmt: skip
        return sequential.launch(jobs, first)

    def side_by_side(self, jobs, first, workers):
        """The jobs in ``workers`` loky processes of cores // workers threads each. A first
        Ctrl-C or SIGTERM marks the sweep stopped and the sweep ends when the running jobs have
        saved their checkpoints; a second one ends it at once (joblib kills the workers)."""
        import joblib
        from hydra_plugins.hydra_joblib_launcher._core import execute_job

        from stnbench.cli.train import count_returns
        from stnbench.errors import Interrupted, deferred_interrupts

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(self.config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
        threads = max(1, joblib.cpu_count() // workers)
        log.info(f"Launching {len(jobs)} jobs, {workers} at once, {threads} threads each")
        stop_file = stop_mark()
        stop_file.unlink(missing_ok=True)
        state, error = Singleton.get_state(), None
        config = {"inner_max_num_threads": threads, "idle_worker_timeout": 10}
        try:
            with deferred_interrupts(first=stop_file.touch) as stopping:
                with joblib.parallel_config("loky", initializer=worker_start,
                                            initargs=(str(stop_file),), **config):  # fmt: skip
                    returns = joblib.Parallel(n_jobs=workers)(
                        joblib.delayed(execute_job)(first + i, overrides, self.hydra_context,
                                                    self.config, self.task_function, state)
                        for i, overrides in enumerate(jobs)
                    )  # fmt: skip
        except BaseException as e:
            if not stopping:
                raise
            error = e
        finally:  # after the handlers are restored: no signal can mark it again
            stop_file.unlink(missing_ok=True)
        if len(stopping) > 1:
            raise Interrupted(
                "sweep stopped at once; its running jobs resume from their last checkpoint "
                "(saved at every validation): rerun the same command"
            ) from error
        if error is not None and not isinstance(error, KeyboardInterrupt):
            raise error
        if stopping:
            raise Interrupted(interrupted_line(returns if error is None else None))
        count_returns(returns)
        return returns


def interrupted_line(returns) -> str:
    """What a sweep stopped by a signal did to the jobs of its round: how many ended (their own
    lines say how: a job's final evaluation is not cut short), how many saved their checkpoints
    mid-run and how many never started; ``returns`` is None where joblib lost them. A job that
    raised counts as ended: its line says how."""
    rerun = "rerun the same command to resume"
    if returns is None:
        return f"sweep interrupted; its running jobs saved their checkpoints: {rerun}"
    values = [r.return_value if r.status == JobStatus.COMPLETED else None for r in returns]
    stopped, waiting = values.count(STOPPED), values.count(NOT_STARTED)
    ended = len(values) - stopped - waiting
    if not stopped and not waiting:
        return (
            f"sweep interrupted after its {ended} running jobs had ended; rerun the same command "
            "to run any left (an ended job trains again only if it failed)"
        )
    said = []
    if ended:
        said.append(f"{ended} ended (each job's line above says how)")
    if stopped:
        said.append(
            f"{stopped} stopped mid-run after saving a checkpoint (each job's line says at "
            "which step)"
        )
    if waiting:
        said.append(f"{waiting} never started")
    return f"sweep interrupted: of its {len(values)} jobs, {', '.join(said)}: {rerun}"
