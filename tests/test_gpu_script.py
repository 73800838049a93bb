"""mptrain/scripts/gpu_check.sh, the one prepared GPU run: valid bash, and a clear refusal where there is no GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "mptrain" / "scripts" / "gpu_check.sh"


@pytest.mark.e2e
def test_the_gpu_script_is_valid_bash_and_names_every_promised_measurement():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    for promised in ("model=resnet50 dataset.image_size=224", "--modes fp32,amp,mixed,bf16", "model=lstm_lm",
                     "model=dcgan", "-m gpu"):
        assert promised in text


@pytest.mark.e2e
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_gpu_script_stops_at_once_with_exit_2():
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 2 and "no CUDA device" in out.stderr
