"""The command line: composed config, Hydra's choices, one-line errors, run directory contents."""

from __future__ import annotations

import pytest

from cli_helpers import TINY, mptrain, read_summary, scalar_tags

SUMMARY_FIELDS = {
    "status", "model", "dataset", "precision", "seed", "final", "best", "samples_per_s",
    "peak_memory_bytes", "peak_memory_method", "skipped_steps", "final_loss_scale", "wall_time_s", "env",
}
TAGS = {
    "train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "perf/samples_per_s", "perf/step_time_ms",
    "memory/peak_bytes", "amp/skipped_steps", "optim/lr",
}


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = mptrain("--cfg", "job", "precision=mixed", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for key in ("seed:", "batch_size:", "root:", "epochs:", "max_steps:", "log_every:", "lr:", "loss_scale: dynamic",
                "allow_tf32:", "keep_batchnorm_fp32:", "mode: mixed"):
        assert key in out.stdout
    assert list(tmp_path.iterdir()) == []  # printing a config writes nothing


@pytest.mark.parametrize("override, group", [("model=nope", "model"), ("precision=fp8", "precision"),
                                              ("dataset=imagenet", "dataset"), ("optim=lion", "optim")])
def test_unknown_choice_lists_the_options(tmp_path, override, group):
    out = mptrain(override, cwd=tmp_path)
    assert out.returncode != 0
    assert f"Available options in '{group}'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


BAD = [
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=-1", "optim.lr must be a number > 0"),
    ("optim.lr=fast", "optim.lr must be a number > 0"),
    ("dataset.batch_size=0", "dataset.batch_size must be a positive integer"),
    ("dataset.batch_size=-4", "dataset.batch_size must be a positive integer"),
    ("precision.loss_scale=0", "precision.loss_scale must be dynamic, null or a number > 0"),
    ("precision.loss_scale=-8", "precision.loss_scale must be dynamic, null or a number > 0"),
    ("precision.loss_scale=auto", "precision.loss_scale must be dynamic, null or a number > 0"),
    ("precision.growth_factor=1", "precision.growth_factor must be a number > 1"),
    ("precision.backoff_factor=1.5", "precision.backoff_factor must be in (0, 1)"),
    ("precision.backoff_factor=0", "precision.backoff_factor must be in (0, 1)"),
    ("precision.growth_interval=0", "precision.growth_interval must be a positive integer"),
    ("precision.hysteresis=0", "precision.hysteresis must be a positive integer"),
    ("trainer.max_steps=0", "trainer.max_steps must be null or a positive integer"),
    ("trainer.epochs=0", "trainer.epochs must be a positive integer"),
    ("optim.momentum=1.5", "optim.momentum must be in [0, 1)"),
]


@pytest.mark.parametrize("override, message", BAD)
def test_bad_value_gets_one_clear_line(tmp_path, override, message):
    out = mptrain(override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("mptrain: error: ") and message in lines[0], out.stderr
    assert "e.g." in lines[0]  # says how to fix it
    assert "Traceback" not in out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing outside the run dir
    assert read_summary(tmp_path / "run")["status"] == "failed"


def test_cuda_requested_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = mptrain("trainer.device=cuda", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().startswith("mptrain: error: trainer.device=cuda")
    assert "Traceback" not in out.stderr


def test_run_dir_holds_hydra_tb_and_a_complete_summary(tmp_path):
    run = tmp_path / "run"
    out = mptrain("precision=mixed", *TINY, "trainer.max_steps=6", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "tb").is_dir()
    summary = read_summary(run)
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["precision"] == "mixed" and summary["final_loss_scale"] == 65536.0
    assert summary["final"]["accuracy"] is not None and summary["peak_memory_bytes"] > 0
    assert any("slow" in w for w in summary["warnings"])  # fp16 on a CPU warns, once
    assert (out.stdout + out.stderr).count("is slow: this CPU has no native fp16") == 1
    assert "samples/s" in out.stdout  # the one-screen summary
    tags = scalar_tags(run / "tb")
    assert TAGS | {"amp/loss_scale"} <= tags.keys()
    assert [e.step for e in tags["train/loss"]] == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize("mode, extra, message", [
    ("fp32", [], "non-finite loss at step 2 (no loss scaler to skip it)"),
    ("mixed", ["precision.min_scale=256"], "below precision.min_scale=256"),
])
def test_divergence_stops_with_status_and_step(tmp_path, mode, extra, message):
    run = tmp_path / "run"
    out = mptrain(f"precision={mode}", *TINY, "trainer.max_steps=12", "optim.lr=1e30", *extra,
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 3
    assert out.stderr.strip().startswith("mptrain: diverged: ") and message in out.stderr
    assert "Traceback" not in out.stderr
    summary = read_summary(run)
    assert summary["status"] == "diverged" and "step" in summary["error"]


def test_missing_data_is_one_line_with_the_fixes(tmp_path):
    run = tmp_path / "run"
    out = mptrain("dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false",
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptrain: error: ") and "MNIST" in lines[0]
    assert "dataset.root" in lines[0] and "download" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-made data folder
