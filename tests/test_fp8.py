"""precision=fp8 through torchao's float8 training: mptrain converts and records, torchao computes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao")
from torchao.float8 import Float8LinearConfig  # noqa: E402
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

from mptrain.precision import Precision  # noqa: E402


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_an_fp8_layer_computes_exactly_what_torchaos_float8linear_does_under_cuda_autocast(compose_cfg, recipe):
    """torchao casts the input to CUDA autocast's dtype only (pytorch/ao#1522); mptrain does it for the CPU too,
    so a layer's output and gradients equal torchao's given the input autocast would have given it."""
    precision = Precision(compose_cfg("precision=fp8", f"precision.fp8_recipe={recipe}", "trainer.device=cpu").precision,
                          torch.device("cpu"))
    reference = _mlp()
    model = precision.prepare(copy.deepcopy(reference))
    assert isinstance(model[0], Float8Linear) and isinstance(model[2], Float8Linear)
    assert not isinstance(model[4], Float8Linear)  # 48x10: not multiples of 16
    report = precision.fp8_report
    assert report["layers"] == ["0", "2"] and "4" in report["kept"] and report["emulated"] is True
    assert "2 Linear layer(s) in FP8 on torchao's emulation" in precision.notes[-1]
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=True)
    theirs = Float8Linear.from_float(copy.deepcopy(reference[0]), config=config)
    x = torch.randn(16, 32)
    with precision.autocast():
        ours_out, theirs_out = model[0](x), theirs(x.to(torch.bfloat16))
    assert ours_out.dtype == torch.bfloat16 and torch.equal(ours_out, theirs_out)
    grad = torch.randn_like(ours_out)
    ours_out.backward(grad)  # rowwise_with_gw_hp's high-precision weight-gradient product failed here on a CPU
    theirs_out.backward(grad)
    assert torch.equal(model[0].weight.grad, theirs.weight.grad) and model[0].weight.grad.isfinite().all()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise_with_gw_hp"])
def test_fp8_trains_a_tiny_transformer_end_to_end(compose_cfg, tmp_path, recipe):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg("debug=tiny_lm", "model=transformer", "model.heads=2", "model.context=8", "precision=fp8",
                      f"precision.fp8_recipe={recipe}", "trainer.device=cpu")
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
    results = trainer.fit()
    assert results["fp8"]["layers"] and results["steps"] == 8 and results["final"]["perplexity"] < 40


def test_a_cnn_is_told_its_convolutions_stay_bf16(compose_cfg):
    precision = Precision(compose_cfg("precision=fp8", "trainer.device=cpu").precision, torch.device("cpu"))
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 30 * 30, 16))
    precision.prepare(net)
    assert "Conv2d layers stay bf16" in precision.notes[-1]


def test_two_networks_are_both_recorded_by_name(compose_cfg):
    """A GAN converts its generator and discriminator: summary.json lists the FP8 layers of both."""
    precision = Precision(compose_cfg("precision=fp8", "trainer.device=cpu").precision, torch.device("cpu"))
    precision.prepare(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 3)), "g")
    precision.prepare(nn.Sequential(nn.Linear(16, 32)), "d")
    report = precision.fp8_report
    assert report["layers"] == ["g.0", "d.0"] and list(report["kept"]) == ["g.1"]
    assert [note.split(":")[0] for note in precision.notes[-2:]] == ["precision=fp8 (tensorwise) g",
                                                                      "precision=fp8 (tensorwise) d"]
