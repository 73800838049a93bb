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


@pytest.mark.e2e
def test_the_dry_run_prints_every_command_and_each_composes():
    """`gpu_check.sh --dry-run` runs nothing and needs no GPU; every bench it would run parses and composes each
    of its (mode, batch) configs as mptrain-bench would, and passes the schema (a typo in the script fails here,
    not on a lent GPU's clock)."""
    import shlex

    from mptrain.bench.cli import configs, default_data, parse_args
    from mptrain.schema import validate

    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120,
                         env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    benches = [line for line in out.stdout.splitlines() if " -m mptrain.bench.cli " in line]
    assert len(benches) == 4 and any("pytest -q -m gpu" in line for line in out.stdout.splitlines())
    assert any("fp8" in line and "model=transformer" in line for line in benches)
    for line in benches:
        args, overrides = parse_args(shlex.split(line.split(" -m mptrain.bench.cli ", 1)[1]))
        with_data = [*overrides, *default_data(overrides)]
        for batch in args.batch_sizes:
            for mode in args.modes:
                validate(configs(with_data, mode, batch, args)[0])
