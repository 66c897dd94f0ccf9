import subprocess
import zipfile

import pytest
from PIL import Image


def run(bin_dir, *args, cwd):
    return subprocess.run(
        [str(bin_dir / "stnbench-data"), *args], cwd=cwd, capture_output=True, text=True
    )


def test_preview_writes_png_from_any_directory(bin_dir, mnist_root, tmp_path):
    # run outside the repository: the configs must come from the installed package
    r = run(
        bin_dir,
        "preview",
        "preview.n=5",
        "preview.scale=2",
        f"data.root={mnist_root}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "outputs" / "preview" / "plain.png"
    assert f"wrote {out.relative_to(tmp_path)}" in r.stdout
    with Image.open(out) as im:
        # 5 digits of 28 px with 2 px borders, upscaled 2x
        assert im.size == (2 * (5 * 30 + 2), 2 * 32)
        assert im.convert("L").getextrema()[1] == 255


def test_fetch_reports_ready_data(bin_dir, mnist_root, tmp_path):
    r = run(bin_dir, "fetch", f"data.root={mnist_root}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "MNIST ready in" in r.stdout


def one_line_error(r, *fragments):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stnbench-data: error:"), r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(bin_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    one_line_error(run(bin_dir, "preview", "data=nope", cwd=tmp_path), "data/nope", "plain")
    one_line_error(
        run(bin_dir, "preview", f"data.root={afile}", cwd=tmp_path), f"data root {afile} is a file"
    )
    one_line_error(run(bin_dir, "preview", "preview.n=0", cwd=tmp_path), "preview.n")
    one_line_error(  # before any work (it allocated 42 GB, then failed)
        run(bin_dir, "preview", "preview.n=100000", cwd=tmp_path),
        "preview.n must be an integer in [1, 256]; got 100000",
    )
    one_line_error(
        run(bin_dir, "fetch", "data.root=/proc/nope", cwd=tmp_path), "data.root must be a folder"
    )
    one_line_error(run(bin_dir, "preview", "preview.nn=3", cwd=tmp_path), "preview.nn")
    one_line_error(
        run(bin_dir, "train", cwd=tmp_path), "unknown action 'train'", "fetch, build, preview"
    )
    one_line_error(
        run(bin_dir, "build", "data=rts", "data.recipe.scale=[2,1]", cwd=tmp_path),
        "data.recipe.scale must be [lo, hi]",
    )
    one_line_error(
        run(bin_dir, "build", "data=rts", "data.recipe.angle=3", cwd=tmp_path), "data.recipe.angle"
    )
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_build_caches_and_preview_shows_originals_above_distorted(bin_dir, mnist_copy, tmp_path):
    r = run(
        bin_dir, "build", "data=rts,tc", "splits=[val]", f"data.root={mnist_copy}", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "rts/val: (10000, 1, 42, 42)" in r.stdout and "tc/val: (10000, 1, 60, 60)" in r.stdout
    assert len(list((mnist_copy / "distorted").glob("*/val-seed0.pt"))) == 2
    r = run(
        bin_dir,
        "preview",
        "data=rts",
        "preview.split=val",
        "preview.n=4",
        "preview.scale=1",
        f"data.root={mnist_copy}",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "outputs" / "preview" / "rts.png") as im:
        assert im.size == (4 * 44 + 2, 2 * 44 + 2)  # two rows of 42x42 with 2 px borders


def test_device_cuda_without_gpu_is_refused(bin_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_error(
        run(bin_dir, "build", "data=r", "device=cuda", cwd=tmp_path), "device=cuda but no CUDA GPU"
    )


def test_help(bin_dir, tmp_path):
    r = run(bin_dir, "--help", cwd=tmp_path)
    assert r.returncode == 0 and "fetch" in r.stdout and "preview" in r.stdout


def test_wheel_ships_the_configs(tmp_path):
    # conf/ lives at the repository root; the installed package must carry it as stnbench.conf
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(repo),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("stnbench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "stnbench/conf/stnbench_data.yaml" in names
    assert "stnbench/conf/data/plain.yaml" in names
    assert "stnbench/conf/row/st_cnn_tps.yaml" in names
    assert "stnbench/conf/experiment/paper_table1_cpu.yaml" in names
    assert "stnbench/conf/hydra/launcher/slurm.yaml" in names
    assert "hydra_plugins/stnbench_launcher/checked_sweeper.py" in names  # Hydra scans there
    assert not any(n.startswith("hydra_plugins/__init__") for n in names)  # a namespace package
