"""`mptrain-numerics --checkpoint`: a bf16-trained transformer checked for FP16 inference, safe as trained and
with a planted overflow (its first FFN's output Linear scaled past 65504, T5's `wo` case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import mptrain

NUMERICS = str(Path(sys.executable).with_name("mptrain-numerics"))
TINY_LM = ["model=transformer", "dataset=synthetic_text", "model.width=16", "model.heads=2", "model.context=32",
           "trainer.max_steps=4", "trainer.checkpoint_every=4"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf16")
    out = mptrain(*TINY_LM, "precision=bf16", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run"


def _check(run_dir: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = subprocess.run([NUMERICS, "--checkpoint", str(run_dir), "--batches", "2", "--json", str(tmp_path / "c.json")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out, json.loads((tmp_path / "c.json").read_text())


@pytest.mark.e2e
def test_a_safe_model_passes(bf16_run, tmp_path):
    out, result = _check(bf16_run, tmp_path)
    assert result["overflowing"] == [] and result["keep_fp32"] == [] and "safe in FP16" in out.stdout
    assert result["layers"] and all(r["amax"] < 65504 for r in result["layers"])


@pytest.mark.e2e
def test_the_planted_overflow_is_found_and_kept_in_fp32(bf16_run, tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / ".hydra").mkdir()
    (planted / ".hydra" / "overrides.yaml").write_text((bf16_run / ".hydra" / "overrides.yaml").read_text())
    state = torch.load(bf16_run / "checkpoint.pt", weights_only=True)
    weights = state["networks"]["model"]  # the first FFN's output now reaches ~1e5, its weights still fit FP16
    weights["blocks.0.mlp.0.weight"] *= 3000
    weights["blocks.0.mlp.2.weight"] *= 3000
    torch.save(state, planted / "checkpoint.pt")
    out, result = _check(planted, tmp_path)
    assert result["overflowing"][0] == "model.blocks.0.mlp.2"  # the first overflow is the planted layer
    assert result["keep_fp32"] == ["model.blocks.0.mlp.2"]  # one module in FP32 is enough: the next LayerNorm
    assert result["amax_after"] > 65504  # normalises the FP32 residual stream back into range; kept exact
    assert "keep in FP32" in out.stdout and "model.blocks.0.mlp.2" in out.stdout


@pytest.mark.e2e
def test_a_folder_without_a_checkpoint_is_one_line(tmp_path):
    out = subprocess.run([NUMERICS, "--checkpoint", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "is not a run dir with a checkpoint" in out.stderr
