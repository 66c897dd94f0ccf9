"""hydra/launcher=stnbench, stnbench-train's default. Without a GPU, a sweep's jobs run side by
side in joblib's worker processes, one per core (``n_jobs``; fewer where memory would not hold
them at 2 GiB each), each limited by loky to cores // workers threads. The jobs left over when
their count is not a multiple of the workers run in fewer workers with more threads each, a last
single one in this process with every core, so that a sweep's tail does not run on one thread.
With a GPU, ``n_jobs`` is 1: Hydra's sequential launcher. Ctrl-C or SIGTERM stops the sweep as it
stops one run: every running job saves its checkpoint, and rerunning the command resumes them.
Measured against the sequential launcher in docs/sweeps.md. Its config node is
stnbench.config.LocalLauncherConf."""

import os
import signal

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

SWEEP_PID = "STNBENCH_SWEEP_PID"  # set for the workers: the process that launched them
WORKER_MEMORY = 2 * 2**30  # a worker's resident memory, at most (1.5 GiB measured on R)


def default_jobs() -> int:
    """Jobs at once: one per core on a CPU-only machine, as many as its memory holds; one with
    a GPU (it holds one run)."""
    import joblib
    import torch

    if torch.cuda.is_available():
        return 1
    return max(1, min(joblib.cpu_count(), memory() // WORKER_MEMORY))


def memory() -> int:
    """The machine's memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def in_worker() -> bool:
    """Whether this process is one of this launcher's workers."""
    return os.environ.get(SWEEP_PID, str(os.getpid())) != str(os.getpid())


def workers() -> list:
    """The processes of joblib's running loky executor (a private attribute: joblib offers no
    public way to signal its workers)."""
    from joblib.externals.loky import reusable_executor

    executor = reusable_executor._executor
    return list(executor._processes.values()) if executor is not None else []


class LocalLauncher(JoblibLauncher):
    def __init__(self, n_jobs: int | None = None, **joblib) -> None:
        super().__init__(**joblib)
        self.n_jobs = n_jobs

    def launch(self, job_overrides, initial_job_idx):
        n, most = len(job_overrides), self.n_jobs or default_jobs()
        full = n - n % most if most > 1 else 0  # rounds that fill every worker
        returns = []
        for start, stop in ((0, full), (full, n)):
            jobs, first = job_overrides[start:stop], initial_job_idx + start
            if len(jobs) == 1 or (jobs and most == 1):
                sequential = BasicLauncher()
                sequential.setup(hydra_context=self.hydra_context,
                                 task_function=self.task_function, config=self.config)  # fmt: skip
                returns += sequential.launch(jobs, first)  # its jobs count themselves
            elif jobs:
                self.joblib["n_jobs"] = min(most, len(jobs))
                returns += self.side_by_side(jobs, first)
        return returns

    def side_by_side(self, jobs, first):
        """The jobs in joblib's workers. A first Ctrl-C or SIGTERM goes on to every worker (a
        terminal's Ctrl-C reaches them too; a run takes the two as one): each running job saves
        its checkpoint and returns, jobs not started yet are not, and the sweep ends; a second one
        ends it at once."""
        from stnbench.cli.train import count_returns
        from stnbench.errors import Interrupted

        def stop(signum, frame):
            if stopping:
                raise KeyboardInterrupt
            stopping.append(signum)
            for p in workers():
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

        stopping = []
        os.environ[SWEEP_PID] = str(os.getpid())
        before = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            returns = count_returns(super().launch(jobs, first))
        except BaseException:
            if not stopping:
                raise
        finally:
            for s, h in before.items():
                signal.signal(s, h)
        if stopping:
            raise Interrupted(
                "sweep interrupted; its running jobs saved their checkpoints (each job's line "
                "above says at which step): rerun the same command to resume"
            )
        return returns
