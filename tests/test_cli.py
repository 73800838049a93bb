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
    "memory/peak_bytes", "scaler/skipped_steps", "optim/lr",
}


@pytest.mark.e2e
def test_cfg_job_prints_the_composed_config(tmp_path):
    out = mptrain("--cfg", "job", "precision=mixed", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for key in ("seed:", "batch_size:", "root:", "epochs:", "max_steps:", "log_every:", "lr:", "loss_scale: dynamic",
                "allow_tf32:", "keep_batchnorm_fp32:", "mode: mixed"):
        assert key in out.stdout
    assert list(tmp_path.iterdir()) == []  # printing a config writes nothing


@pytest.mark.e2e
@pytest.mark.parametrize("override, group", [("model=nope", "model"), ("precision=fp4", "precision"),
                                              ("dataset=imagenet", "dataset"), ("optim=lion", "optim")])
def test_unknown_choice_lists_the_options(tmp_path, override, group):
    out = mptrain(override, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    line = out.stderr.strip()
    assert line.startswith(f"mptrain: error: {override} is not an option of {group}; ") and "choose one of " in line
    options = line.rsplit("choose one of ", 1)[1].split(", ")
    assert "fp32" in options or "resnet" in options or "sgd" in options or "fashion_mnist" in options
    assert not any(o.endswith("_schema") for o in options)  # the schemas are not choices a user makes
    assert "Traceback" not in out.stderr + out.stdout and list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_cuda_requested_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = mptrain("trainer.device=cuda", *TINY, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().startswith("mptrain: error: trainer.device=cuda")
    assert "Traceback" not in out.stderr


@pytest.mark.e2e
def test_run_dir_holds_hydra_tb_and_a_complete_summary(tmp_path):
    run = tmp_path / "run"
    out = mptrain("precision=mixed", "precision.cpu_fp16=native", *TINY, "trainer.max_steps=6", f"hydra.run.dir={run}",
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "tb").is_dir()
    summary = read_summary(run)
    assert SUMMARY_FIELDS <= summary.keys()
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["precision"] == "mixed" and summary["final_loss_scale"] == 65536.0
    assert summary["final"]["accuracy"] is not None and summary["peak_memory_bytes"] > 0
    # native FP16 chosen on a CPU warns, once (slow with or without FP16 units: emulation.native_is_fast)
    assert any("slow" in w for w in summary["warnings"]) and summary["fp16_kernels"] == "native"
    assert (out.stdout + out.stderr).count("precision.cpu_fp16=native is slow: this CPU") == 1
    assert "samples/s" in out.stdout  # the one-screen summary
    tags = scalar_tags(run / "tb")
    assert TAGS | {"scaler/loss_scale"} <= tags.keys()
    assert [e.step for e in tags["train/loss"]] == [2, 4, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_missing_data_is_one_line_with_the_fixes(tmp_path):
    run = tmp_path / "run"
    out = mptrain("dataset=mnist", f"dataset.root={tmp_path / 'data'}", "dataset.download=false",
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptrain: error: ") and "MNIST" in lines[0]
    assert "dataset.root" in lines[0] and "download" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no half-made data folder, and no folder for a run that never began
