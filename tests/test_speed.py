"""The speed-ups keep their promises: fewer page faults, same logits; the benchmark still runs."""

import copy
import importlib.util
import resource
from pathlib import Path

import pytest
import torch

from stnbench import allocator
from stnbench.models import build
from stnbench.train import prepare


def minor_faults(repeats=10, megabytes=64) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        torch.empty(megabytes << 18).fill_(1.0)  # float32: 4 bytes each, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_keeping_freed_memory_stops_the_page_faults():
    if not allocator.keep_freed_memory():
        pytest.skip("not glibc")
    try:
        minor_faults(3)  # the heap grows to fit
        kept = minor_faults()
        allocator.restore()
        default = minor_faults()
    finally:
        allocator.keep_freed_memory()
    # glibc's default maps each 64 MB buffer fresh and faults its 16k pages in again, every time
    assert default > 10 * 10_000
    assert kept * 5 < default  # kept: the heap's pages are reused (at most one buffer's worth)


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    net = build("st_cnn", "affine", 42)
    x = torch.rand(8, 1, 42, 42)
    fast = prepare(copy.deepcopy(net), torch.device("cpu"))
    assert fast.classifier[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), net(x), atol=1e-4, rtol=1e-4)


def test_benchmark_row_runs():
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.row("st_fcn", "affine", 28, torch.device("cpu"), seconds=0.2)
    assert row["train_img_s"] > 0 and row["baseline_img_s"] > 0 and row["mflop_per_image"] > 1
