"""Whole runs through the CLI: every mode in one Hydra sweep, real Fashion-MNIST, the packaged wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from test_cli import SUMMARY_FIELDS, TAGS

from cli_helpers import TINY, mptrain, read_summary, scalar_tags

MODES = ["fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16"]
REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _sweep(tmp_path: Path, *overrides: str, timeout: float = 600) -> list[Path]:
    sweep = tmp_path / "sweep"
    out = mptrain("-m", f"precision={','.join(MODES)}", *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                  timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(runs) == len(MODES)
    return runs


def _check_runs(runs: list[Path], steps: int, first_group: str) -> None:
    by_mode = {read_summary(r)["precision"]: r for r in runs}
    assert sorted(by_mode) == sorted(MODES)
    for mode, run in by_mode.items():
        s = read_summary(run)
        assert SUMMARY_FIELDS <= s.keys(), mode
        assert s["status"] == "completed" and s["steps"] == steps, (mode, s.get("error"))
        assert s["samples_per_s"] > 0 and s["peak_memory_bytes"] > 0
        assert 0.0 <= s["final"]["accuracy"] <= 1.0
        scaled = mode in ("mixed", "amp")
        assert (s["final_loss_scale"] is not None) == scaled, mode
        expected = TAGS if scaled else TAGS - {"scaler/skipped_steps"}  # nothing is skipped without a scaler
        assert expected <= scalar_tags(run / "tb").keys(), mode
    # folder names come from the overrides, group choices first, seed kept apart
    for mode, run in by_mode.items():
        assert run.name == "seed=0" and run.parent.name.startswith(f"{first_group},precision={mode},")


@pytest.mark.e2e
def test_sweep_runs_every_mode_tiny(tmp_path):
    _check_runs(_sweep(tmp_path, *TINY, "trainer.max_steps=4"), steps=4, first_group="debug=tiny")


@pytest.mark.e2e
@pytest.mark.slow
def test_sweep_runs_every_mode_resnet20(tmp_path):
    """The issue's command: ResNet-20 on the default synthetic shapes, 20 steps in each mode.

    About 11 minutes on a 2-core CPU: fp16 convolutions there take ~7 s a step."""
    _check_runs(_sweep(tmp_path, "dataset=synthetic", "trainer.max_steps=20", timeout=2400), steps=20,
                first_group="dataset=synthetic")


@pytest.mark.e2e
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist (make data)")
def test_real_fashion_mnist_run(tmp_path):
    run = tmp_path / "run"
    out = mptrain("model.depth=8", "model.width=8", "trainer.max_steps=60", "trainer.log_every=20",
                  "dataset.root=" + str(tmp_path / "none"), f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    s = read_summary(run)
    assert s["dataset"] == "fashion_mnist" and s["status"] == "completed"
    assert s["final"]["accuracy"] > 0.45  # 60 steps of a small ResNet on real data: far above chance (0.1)
    assert not (tmp_path / "none").exists()  # found in the Debian folder; nothing downloaded or created


@pytest.mark.e2e
def test_wheel_carries_the_config_tree_and_runs_from_anywhere(tmp_path):
    """A non-editable wheel must find conf/ inside the package, from any directory."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True,
    )
    if build.returncode != 0 and "hatchling" in build.stderr:
        build = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(REPO)],
            capture_output=True, text=True,
        )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("mptrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mptrain/conf/config.yaml" in names and "mptrain/conf/precision/mixed.yaml" in names
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv=['mptrain','--cfg','job','precision=mixed']; "
         "import mptrain.cli as c; print(c.config_dir()); c.main()"],
        cwd=elsewhere, capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(site / "mptrain" / "conf") in out.stdout and "mode: mixed" in out.stdout


@pytest.mark.e2e
def test_a_failed_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    out = mptrain("-m", "optim.lr=-1,0.05", *TINY, "trainer.max_steps=2", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    statuses = {read_summary(p.parent)["overrides"][0]: read_summary(p.parent)["status"]
                for p in sweep.rglob("summary.json")}
    assert statuses == {"optim.lr=-1": "failed", "optim.lr=0.05": "completed"}
    assert "optim.lr must be a number > 0" in out.stderr
