"""Faults a user causes or meets, through stnbench-train as a user runs it: each ends in one line
naming the file or setting and what to do, with a non-zero exit status, and loses nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

RUN = [
    "data=plain",
    "model=fcn",
    "data.train_size=2000",
    "train.batch_size=50",
    "train.val_every=20",
    "train.val_size=500",
    "train.log_every=10",
    "schedule=constant",
    "train.progress=false",
]


def command(bin_dir, out, *overrides):
    return [str(bin_dir / "stnbench-train"), *RUN, *overrides, f"hydra.run.dir={out}"]


def run(bin_dir, out, *overrides, timeout=120):
    return subprocess.run(
        command(bin_dir, out, *overrides), capture_output=True, text=True, timeout=timeout
    )


def one_line(result, code: int) -> str:
    """The one line a refused or failed command printed, after checking its exit status."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_a_folder_is_bound_to_its_configuration(mnist_root, bin_dir, tmp_path):
    out = tmp_path / "run"
    assert run(bin_dir, out, "train.steps=40").returncode == 0
    again = run(bin_dir, out, "train.steps=40")  # the same command: the finished result
    assert again.returncode == 0 and "stnbench-train: ok" in again.stdout
    other = one_line(run(bin_dir, out, "train.steps=40", "optim.lr=0.5"), 2)
    assert f"{out} holds a run of another configuration (optim.lr: 0.01 there, 0.5 now)" in other
    assert json.loads((out / "metrics.json").read_text())["lr"] == 0.01  # untouched
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == 0.01


def test_a_corrupt_checkpoint_names_the_file_and_the_remedy(mnist_root, bin_dir, tmp_path):
    out = tmp_path / "run"
    assert run(bin_dir, out, "train.steps=40").returncode == 0
    (out / "metrics.json").unlink()  # unfinished, as if killed
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    line = one_line(run(bin_dir, out, "train.steps=40"), 1)
    assert line.startswith(f"stnbench-train: error: {ckpt} is unreadable (")
    assert line.endswith(f"set it aside to start this run over: mv {ckpt} {ckpt}.bad")
    assert not (out / "metrics.json").exists()  # nothing a table would read
    os.rename(ckpt, f"{ckpt}.bad")  # the remedy it offers
    assert run(bin_dir, out, "train.steps=40").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_says_where_it_stopped_and_resumes(mnist_root, bin_dir, tmp_path, sig):
    """A run far beyond the machine's reach says how long it would take; a second process on its
    folder is refused while it runs; Ctrl-C or SIGTERM checkpoints and says how to resume."""
    out = tmp_path / "run"
    steps = "train.steps=1000000000"
    proc = subprocess.Popen(command(bin_dir, out, steps), stderr=subprocess.PIPE, text=True)
    log = out / "train.log"
    wait_for(lambda: log.exists() and "steps to go: about" in log.read_text())
    assert " days, " in log.read_text()  # 10^9 steps at this rate
    second = one_line(run(bin_dir, out, steps), 2)
    assert f"{out} is in use by another process (pid {proc.pid}); wait for it" in second
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    (line,) = err.strip().splitlines()
    step = torch.load(out / "checkpoint.pt")["state"]["step"]
    assert step > 0
    assert (
        line
        == f"stnbench-train: {out}: interrupted at step {step}; rerun the same command to resume"
    )  # noqa: E501
    assert not (out / "metrics.json").exists()
    resume_then_stop(bin_dir, out, step, steps)


def resume_then_stop(bin_dir, out, step, *overrides):
    """Rerun the command, check it resumes from ``step``, then stop it with Ctrl-C."""
    proc = subprocess.Popen(command(bin_dir, out, *overrides), stderr=subprocess.DEVNULL)
    resumed = f"resuming {out} from step {step}"

    def training():  # the loop's own handler is in place (not a background job's SIG_IGN)
        text = (out / "train.log").read_text()
        return resumed in text and "val loss" in text.split(resumed)[-1]

    wait_for(training)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130


@pytest.mark.parametrize(
    "sig, group",
    [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGTERM", "terminal Ctrl-C", "SIGTERM to the group (Slurm, timeout)"],
)
def test_an_interrupted_sweep_checkpoints_its_running_jobs(
    mnist_root, bin_dir, tmp_path, sig, group
):
    """4 jobs in 2 workers (the default launcher's, hydra.launcher.n_jobs=2 on any machine):
    SIGTERM to the command, Ctrl-C in a terminal (SIGINT to the process group) or SIGTERM to the
    group checkpoints the 2 running jobs, never starts the other 2 and ends in one line, exit
    status 130."""
    sweep = tmp_path / "sweep"
    lrs = "optim.lr=0.01,0.02,0.03,0.04"
    args = [str(bin_dir / "stnbench-train"), "-m", *RUN, lrs, "train.steps=1000000000",
            "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def training():
        return sum("steps to go" in f.read_text() for f in sweep.rglob("train.log"))

    try:
        wait_for(lambda: training() == 2)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:  # a sweep that did not stop is not left training
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "stnbench-train: sweep interrupted: of its 4 jobs, 2 stopped mid-run after saving a "
        "checkpoint (each job's line says at which step), 2 never started: rerun the same "
        "command to resume"
    )
    ran = [f.parent for f in sweep.rglob("checkpoint.pt")]
    assert len(ran) == 2 and not list(sweep.rglob("metrics.json"))  # the others never started
    for out in ran:
        step = torch.load(out / "checkpoint.pt")["state"]["step"]
        assert f"interrupted at step {step}; checkpoint saved" in (out / "train.log").read_text()


def test_a_second_signal_stops_a_sweep_at_once(mnist_root, bin_dir, tmp_path):
    """SIGTERM then Ctrl-C before the running jobs have stopped: the sweep ends at once (joblib
    ends the workers) and says so, rather than that they saved their checkpoints."""
    sweep = tmp_path / "sweep"
    args = [str(bin_dir / "stnbench-train"), "-m", *RUN, "optim.lr=0.01,0.02",
            "train.steps=1000000000", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(lambda: sum("steps to go" in f.read_text() for f in sweep.rglob("train.log")) == 2)
        proc.send_signal(signal.SIGTERM)  # two signal numbers: Python runs both handlers
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    # (multiprocessing's resource tracker may warn after it of what the killed workers held)
    stopped = "stnbench-train: sweep stopped at once; its running jobs resume"
    assert any(line.startswith(stopped) for line in err.splitlines()), err


def test_deferred_interrupts_records_the_first_signal_and_raises_at_the_second():
    from stnbench.errors import deferred_interrupts

    marks, before = [], signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup, as in CI
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts(first=lambda: marks.append("first")) as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(lambda: caught, seconds=5)
            assert caught == [signal.SIGTERM] and marks == ["first"]  # recorded, not raised
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False, seconds=5)  # the second signal raises in here
    assert caught == [signal.SIGTERM, signal.SIGINT] and marks == ["first"]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_a_killed_run_leaves_no_stale_lock(mnist_root, bin_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(bin_dir, out, "train.steps=100000"))
    wait_for(lambda: (out / "checkpoint.pt").exists())
    proc.kill()
    proc.wait()
    step = torch.load(out / "checkpoint.pt")["state"]["step"]
    resume_then_stop(bin_dir, out, step, "train.steps=100000")


def patched_run(out, patch: str) -> str:
    """The one line stnbench-train prints for a 40-step run in ``out`` in an interpreter that
    first runs ``patch`` (Python source standing in for a fault)."""
    main = "import sys\nfrom stnbench.cli.train import main\n"
    main += "sys.argv = ['stnbench-train', *sys.argv[1:]]\nsys.exit(main())\n"
    args = [*RUN, "train.steps=40", f"hydra.run.dir={out}"]
    result = subprocess.run(
        [sys.executable, "-c", patch + main, *args], capture_output=True, text=True, timeout=120
    )
    return one_line(result, 1)


FULL = {  # how a full disk reaches torch.save's caller: an OSError, or torch's writer's own
    "oserror": "raise OSError(errno.ENOSPC, 'No space left on device', str(f))",
    "torch": "raise RuntimeError('[enforce fail at inline_container.cc:672] . PytorchStreamWriter"
    " failed writing file data/0: file write failed')",
}


@pytest.mark.parametrize("how", FULL)
def test_a_full_disk_is_one_line_and_records_no_result(mnist_root, bin_dir, tmp_path, how):
    """torch.save failing as on a full disk, in the real command (a patched interpreter whose
    disk has 1 MB left)."""
    out = tmp_path / "run"
    line = patched_run(
        out,
        "import errno, shutil, torch\n"
        "def full(obj, f, *a, **k):\n"
        f"    {FULL[how]}\n"
        "torch.save = full\n"
        "shutil.disk_usage = lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6)\n",
    )
    assert line.startswith(f"stnbench-train: error: {out}: failed: OSError: [Errno 28] No space")
    assert "the traceback is in its train.log; rerun the same command to retry" in line
    assert "Traceback (most recent call last)" in (out / "train.log").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["test_error"] is None


def test_out_of_memory_says_to_lower_the_batch_not_to_rerun(mnist_root, bin_dir, tmp_path):
    """A training step whose allocation fails, as torch's CPU allocator says it, in the real
    command (a patched interpreter): a rerun would fail the same way."""
    out = tmp_path / "run"
    line = patched_run(
        out,
        "import stnbench.train as t\n"
        "def oom(*a, **k):\n"
        "    raise RuntimeError(\"DefaultCPUAllocator: can't allocate memory: you tried to "
        'allocate 42949672960 bytes. Error code 12 (Cannot allocate memory)")\n'
        "t.train_step = oom\n",
    )
    assert line.startswith(f"stnbench-train: error: {out}: failed: RuntimeError: DefaultCPU")
    assert line.endswith("out of memory: lower train.batch_size (50) or train.eval_batch_size "
                         "(1000) and rerun")  # fmt: skip
    assert "rerun the same command" not in line


def test_an_output_dir_that_cannot_be_made_is_one_line(bin_dir, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    line = one_line(run(bin_dir, blocker / "run", "train.steps=40"), 1)
    assert line.startswith("stnbench-train: error: Not a directory writing ")
    assert "rerun the same command" in line


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=r", "data.recipe.canvas=8"], "data.recipe.canvas must be an integer >= 28"),
        (["data=rts", "model=st_cnn", "model.out_size=60"], "model.out_size must be at most"),
        (["data.train_size=60000"], "data.train_size must be an integer in [1, 50000] or null"),
        (["train.val_size=20000"], "train.val_size must be an integer in [1, 10000] or null"),
    ],
)
def test_settings_that_cannot_mean_anything_are_refused(bin_dir, tmp_path, overrides, message):
    out = tmp_path / "run"
    line = one_line(run(bin_dir, out, *overrides), 2)
    assert message in line
    assert not out.exists()
