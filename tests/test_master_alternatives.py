"""The master weights' rivals: BF16 weights updated with nearest rounding (bf16_pure), stochastic rounding
(bf16_sr: torchao's rounding) and Kahan summation (bf16_kahan: torch-optimi)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from mptrain.optim import build_optimizer

pytest.importorskip("torchao")
pytest.importorskip("optimi")

STEP = 2.0**-10  # a relative update of 2^-10 on a weight of 1: below half a BF16 ulp (2^-8)
SGD = OmegaConf.create({"name": "sgd", "lr": STEP, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                        "decay_norm_and_bias": False})


def _thousand_steps(update: str, n: int = 4096) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = build_optimizer(SGD, [w], update=update)
    for _ in range(1000):
        w.grad = torch.ones_like(w)
        opt.step()
    return w.detach().float()


def test_nearest_rounding_loses_every_small_update():
    assert torch.equal(_thousand_steps("nearest"), torch.ones(4096))  # bf16_pure: all 1000 updates lost


def test_stochastic_rounding_keeps_them_in_expectation():
    exact = 1 - 1000 * STEP
    w = _thousand_steps("stochastic")
    assert abs(w.mean().item() - exact) < 2e-3 and w.std().item() > 0  # unbiased, with the rounding's spread


def test_kahan_summation_keeps_them_to_fp32_level():
    exact = 1 - 1000 * STEP
    w = _thousand_steps("kahan")
    assert (w - exact).abs().max().item() < 4e-3  # within a BF16 ulp of the exact sum; no spread
    assert w.std().item() == 0


def test_bytes_per_parameter_by_hand(compose_cfg, tmp_path):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    expected = {"fp32": 4 + 4 + 4, "mixed": 2 + 2 + 8 + 4, "bf16_pure": 2 + 2 + 2, "bf16_kahan": 2 + 2 + 2 + 2}
    for mode, total in expected.items():  # SGD with momentum: one state tensor per weight (+ Kahan's buffer)
        cfg = compose_cfg("debug=tiny", f"precision={mode}", "trainer.device=cpu", "optim.nesterov=false")
        trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
        trainer.fit(evaluate=False)
        got = trainer.results()["bytes_per_parameter"]["model"]
        assert got["total"] == pytest.approx(total, rel=0.05), (mode, got)  # FP32 BatchNorm weights: a few %


@pytest.mark.parametrize("mode", ["bf16_pure", "bf16_sr", "bf16_kahan"])
def test_each_mode_trains_end_to_end(compose_cfg, tmp_path, mode):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg("debug=tiny", f"precision={mode}", "trainer.device=cpu", "optim.nesterov=false")
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
    results = trainer.fit()
    assert results["steps"] == 8 and results["final"]["loss"] < 10
    assert trainer.task.model.fc.weight.dtype == torch.bfloat16 if hasattr(trainer.task.model, "fc") else True


def test_kahan_with_nesterov_is_refused_in_one_line(compose_cfg):
    from mptrain.errors import UserError
    from mptrain.schema import validate

    with pytest.raises(UserError, match="no Nesterov momentum; set optim.nesterov=false"):
        validate(compose_cfg("precision=bf16_kahan"))
