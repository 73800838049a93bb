"""Block-scaled formats (precision=mx) and optimizer-state precision (optim.state): the quantizer against torchao's
bit for bit, a converted layer against products of dequantized operands, training end to end, bytes per parameter
by hand, the per-block instrument and resume."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")
from torchao.prototype.mx_formats.mx_tensor import MXTensor  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402

from mptrain.precision import Precision, blockfmt, mx  # noqa: E402

MX_FORMATS = [f for f in blockfmt.FORMATS if f != "nvfp4"]
LM = ["debug=tiny_lm", "model=transformer", "model.heads=2", "model.width=32", "model.context=8", "trainer.device=cpu"]


def _wide(rows=64, cols=128, seed=0) -> torch.Tensor:
    """Gaussian rows spread over 2^-20..2^10, a zero block and a lone tiny value: every scale path."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-20, 10, (rows, 1), generator=g).float())
    x[3, :32] = 0
    x[5, 40] = 1e-30
    return x


def _torchao(x: torch.Tensor, fmt: str, rounding: str = "floor") -> torch.Tensor:
    """The reference: torchao's own quantize-dequantize."""
    if fmt == "nvfp4":
        scale = per_tensor_amax_to_scale(x.abs().amax())
        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=scale).dequantize(torch.float32)
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    return MXTensor.to_mx(x, blockfmt._torchao_elem_dtype(blockfmt.FORMATS[fmt]), 32,
                          scaling_mode=ScaleCalculationMode(rounding)).dequantize(torch.float32)


@pytest.mark.parametrize("fmt, rounding", [(f, r) for f in MX_FORMATS for r in ("floor", "ceil", "even", "rceil")]
                         + [("nvfp4", "floor")])
def test_the_hand_written_quantizer_equals_torchaos_bit_for_bit(fmt, rounding):
    """The path stochastic rounding and 2-D tiles take (blockfmt._blocks_qdq), at round-to-nearest on 1-D blocks,
    against torchao's MXTensor / NVFP4Tensor: every value, every format and scale rounding."""
    x = _wide()
    spec = blockfmt.FORMATS[fmt]
    tensor_scale = blockfmt.nvfp4_tensor_scale(x) if spec.scale == "e4m3" else None
    ours, _ = blockfmt._blocks_qdq(x.reshape(-1, spec.block_size), spec, rounding, False, tensor_scale)
    assert torch.equal(ours.reshape(x.shape), _torchao(x, fmt, rounding))
    assert torch.equal(blockfmt.qdq(x, spec, rounding=rounding), _torchao(x, fmt, rounding))  # the library path


def test_a_bf16_operand_quantizes_as_its_fp32_value():
    x = _wide().to(torch.bfloat16)
    assert torch.equal(blockfmt.qdq(x, blockfmt.FORMATS["mxfp4"]), _torchao(x.float(), "mxfp4"))


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4", "nvfp4"])
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased(fmt):
    spec = blockfmt.FORMATS[fmt]
    torch.manual_seed(0)
    x = torch.rand(256, 64) * 3 + 0.1
    x[:, 0] = 6.0  # every block's amax: the same scale in every draw
    near = blockfmt.qdq(x, spec)
    draws = torch.stack([blockfmt.qdq(x, spec, stochastic=True) for _ in range(200)])
    up, down = draws.amax(0), draws.amin(0)
    assert ((draws == up) | (draws == down)).all()  # at most two values: the grid's neighbours of x
    both = up != down
    assert (down[both] <= x[both]).all() and (up[both] >= x[both]).all() and both.float().mean() > 0.5
    assert ((near == up) | (near == down)).all()  # nearest is one of them (the only one seen, when x is close)
    y = torch.full((256, 64), 0.3)  # between two grid values in every format: nearest is biased, stochastic not
    y[:, ::16] = 6.0
    off = y != 6.0
    nearest_bias = (blockfmt.qdq(y, spec) - y)[off].mean().abs()
    stochastic_bias = (torch.stack([blockfmt.qdq(y, spec, stochastic=True) for _ in range(20)]).mean(0) - y)[off].mean()
    assert nearest_bias > 1e-3 and stochastic_bias.abs() < nearest_bias / 10


def test_2d_tiles_quantize_a_weight_and_its_transpose_alike():
    w = torch.randn(64, 96)
    for fmt in ("mxfp4", "nvfp4"):
        spec = blockfmt.FORMATS[fmt]
        assert torch.equal(blockfmt.qdq(w, spec, tiles=True).t(), blockfmt.qdq(w.t().contiguous(), spec, tiles=True))
        assert not torch.equal(blockfmt.qdq(w, spec).t(), blockfmt.qdq(w.t().contiguous(), spec))  # 1-D do not


def test_the_random_hadamard_transform_is_orthogonal_and_leaves_a_product_alone():
    h = blockfmt.hadamard(16, seed=0, device=torch.device("cpu"))
    assert torch.allclose(h @ h.t(), torch.eye(16), atol=1e-6)
    a, b = torch.randn(8, 64, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    assert torch.allclose(mx._blockwise(a, h.double()) @ mx._blockwise(b, h.double()).t(), a @ b.t())


def _layer(compose_cfg, *overrides) -> tuple[nn.Linear, Precision]:
    cfg = compose_cfg("precision=mx", "trainer.device=cpu", *overrides).precision
    precision = Precision(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    model = precision.prepare(nn.Sequential(nn.Linear(64, 96)))
    return model[0], precision


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "nvfp4"])
def test_a_converted_layer_computes_the_products_of_torchaos_dequantized_operands(compose_cfg, fmt):
    """Forward, input gradient and weight gradient against products computed here from torchao's dequantized
    operands, each blocked along its product's contraction dimension; the tokens (40) padded to a block."""
    layer, precision = _layer(compose_cfg, f"precision.block_format={fmt}")
    assert isinstance(layer, mx.MXLinear)
    x = torch.randn(40, 64, requires_grad=True)
    y = layer(x)  # outside autocast: FP32 in, FP32 out
    g = torch.randn_like(y)
    y.backward(g)
    dq = lambda t: _torchao(t.contiguous(), fmt)  # noqa: E731
    w = layer.weight.detach()
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, -t.shape[0] % 32))  # noqa: E731
    assert torch.equal(y.detach(), dq(x.detach()) @ dq(w).t() + layer.bias.detach())
    assert torch.equal(x.grad, dq(g) @ dq(w.t()).t())
    assert torch.equal(layer.weight.grad, dq(pad(g).t()) @ dq(pad(x.detach()).t()).t())
    assert torch.equal(layer.bias.grad, g.sum(0))


def test_under_autocast_the_layer_takes_and_gives_bf16(compose_cfg):
    layer, precision = _layer(compose_cfg)
    x = torch.randn(8, 64, requires_grad=True)
    with precision.autocast():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_layers_that_do_not_fit_or_are_kept_stay_bf16_and_are_named(compose_cfg):
    cfg = compose_cfg("precision=mx", "trainer.device=cpu", "precision.mx_keep=[head]").precision
    precision = Precision(cfg, torch.device("cpu"))
    net = nn.Sequential()
    net.add_module("body", nn.Linear(64, 64))
    net.add_module("odd", nn.Linear(64, 10))
    net.add_module("head", nn.Linear(64, 64))
    precision.prepare(net)
    report = precision.mx_report
    assert report["layers"] == ["body"] and report["kept"]["head"] == "precision.mx_keep"
    assert "multiples of 32" in report["kept"]["odd"] and type(net.odd) is nn.Linear
    assert "1 Linear layer(s)" in precision.notes[-1] and "2 kept in bf16" in precision.notes[-1]


@pytest.mark.parametrize("options", [
    ["precision.block_format=mxfp8_e4m3"],
    ["precision.block_format=nvfp4", "precision.weight_blocks=2d", "precision.hadamard=true",
     "precision.grad_rounding=stochastic"],
    pytest.param(["precision.block_format=mxfp8_e5m2", "precision.scale_rounding=rceil"], marks=pytest.mark.slow),
    pytest.param(["precision.block_format=mxfp6_e3m2"], marks=pytest.mark.slow),
    pytest.param(["precision.block_format=mxfp6_e2m3", "precision.block_format_grad_weight=mxfp8_e5m2"],
                 marks=pytest.mark.slow),
    pytest.param(["precision.block_format=mxfp4", "precision.grad_rounding=stochastic", "precision.hadamard=true"],
                 marks=pytest.mark.slow),
])  # fmt: skip
def test_every_format_trains_a_tiny_transformer_and_the_instrument_reads_it(compose_cfg, tmp_path, options):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.telemetry.numerics import NumericsProbe

    cfg = compose_cfg(*LM, "precision=mx", *options)
    probe = NumericsProbe(every=4, run_dir=tmp_path)
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), probe, [])
    results = trainer.fit()
    assert results["mx"]["layers"] and results["steps"] == 8 and results["final"]["perplexity"] < 40
    records = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    ours = [r for r in records if r["kind"] == "mx"]
    products = {r["layer"].rsplit(".", 2)[-1] for r in ours}
    assert products == {"forward", "grad_input", "grad_weight"}
    assert all(0 <= r["flushed_frac"] <= 1 and 0 < r["rel_error"] < 1 for r in ours)
    assert {r["format"] for r in ours} >= {cfg.precision.block_format}


def test_mptrain_numerics_names_the_layers_a_block_format_hurts_most():
    import io

    from mptrain.diagnose.cli import analyse, compose_scan, print_mx, scan

    cfg = compose_scan([*LM[:-1], "dataset.batch_size=4"], 2)
    sums = scan(cfg, 2, "mxfp4")
    result = analyse(sums, 2, 0.999, 8.0)
    assert result["mx"] and {r["format"] for r in result["mx"]} == {"mxfp4"}
    out = io.StringIO()
    print_mx(result["mx"], result["mx_hurt_most"], out)
    assert "hurt most" in out.getvalue() and "blocks.0" in out.getvalue()


# --- optimizer-state precision -------------------------------------------------------------------------------------

def _adam(state: str, name: str = "adamw", steps: int = 2):
    from omegaconf import OmegaConf

    from mptrain.optim import build_optimizer

    cfg = OmegaConf.create({"name": name, "state": state, "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                            "weight_decay": 0.0, "decay_norm_and_bias": False, "library": "torch"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 10))  # 32,768 + 256 + 2,560 + 10 values
    optimizer = build_optimizer(cfg, list(model.parameters()))
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 128)).square().mean().backward()
        optimizer.step()
    return model, optimizer


# bytes of the two moments by hand: only the 32,768-value weight (>= 4096 values, a whole number of blocks) is
# quantized; the other 2,826 values keep two FP32 moments (8 bytes each value)
N, BIG, SMALL = 35_594, 32_768, 2_826
BY_HAND = {
    "fp32": 8 * N,
    "bf16": 2 * 2 * N,
    "8bit": 2 * (BIG + 4 * BIG // 256 + 4 * 256) + 8 * SMALL,  # 1-byte codes, FP32 scale per 256, 256-entry table
    "4bit": 2 * (BIG // 2 + 4 * BIG // 128 + 4 * 16) + 8 * SMALL,  # 4-bit codes, FP32 scale per 128, 16-entry table
    "fp8": 2 * (BIG + 4 * BIG // 256) + 8 * SMALL,  # E4M3 codes, FP32 scale per 256
}


@pytest.mark.parametrize("state", list(BY_HAND))
def test_optimizer_state_bytes_per_parameter_match_the_hand_count(state):
    from mptrain.precision.stepper import PrecisionStepper

    model, optimizer = _adam(state)
    stepper = PrecisionStepper.__new__(PrecisionStepper)
    stepper.model, stepper.optimizer, stepper.masters = model, optimizer, None
    counted = stepper.bytes_per_parameter()["optimizer_state"] * N
    steps = 4 * len(optimizer.state)  # one FP32 step counter per tensor
    assert counted - steps == pytest.approx(BY_HAND[state], abs=1)


def test_bf16_moments_are_the_fp32_moments_rounded():
    _, fp32 = _adam("fp32", "adam", steps=1)  # one step: the same gradients in both
    _, bf16 = _adam("bf16", "adam", steps=1)
    for a, b in zip(fp32.state.values(), bf16.state.values()):
        for moment in ("exp_avg", "exp_avg_sq"):
            assert b[moment].dtype == torch.bfloat16
            assert torch.allclose(b[moment].float(), a[moment].to(torch.bfloat16).float(), rtol=2**-8, atol=0)


def test_the_report_draws_each_formats_operand_statistics(tmp_path):
    import pandas as pd

    from mptrain.report import plots

    rows = []
    for arm, error in (("mx block_format=mxfp4", 0.12), ("mx", 0.03)):
        run = tmp_path / arm.replace(" ", "_")
        run.mkdir()
        records = [{"step": 4, "kind": "mx", "layer": f"model.blocks.0.mlp.0.{operand}", "format": "mxfp4",
                    "rel_error": error, "flushed_frac": error / 2}
                   for operand in ("input.forward", "weight.forward", "grad_output.grad_weight")]
        (run / "numerics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        rows.append({"run_dir": str(run), "precision": "mx", "arm": arm, "seed": 0})
    rows.append({"run_dir": str(tmp_path / "none"), "precision": "bf16", "arm": "bf16", "seed": 0})
    path = plots.mx_operands(pd.DataFrame(rows), tmp_path / "mx.png")
    assert path is not None and path.stat().st_size > 0
    assert plots.mx_operands(pd.DataFrame(rows[-1:]), tmp_path / "none.png") is None


def test_the_instrument_measures_what_storing_moments_in_8_bits_rounds_away(compose_cfg, tmp_path):
    """optim.state=8bit: per weight, the stored moments against an FP32 twin's from the same state; tensors under
    4096 values keep FP32 moments and differ by nothing."""
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.telemetry.numerics import NumericsProbe

    cfg = compose_cfg(*LM, "precision=bf16", "optim.state=8bit", "optim.weight_decay=0")
    probe = NumericsProbe(every=2, run_dir=tmp_path)
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), probe, [])
    trainer.fit(evaluate=False)
    records = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    errors = {r["layer"]: r["moment_error"] for r in records if r["kind"] == "optimizer_state" and r["step"] == 8}
    big = [n for n, p in trainer.task.networks()["model"].named_parameters() if p.numel() >= 4096]
    assert big and all(0 < errors[f"model.{n}"] < 0.2 for n in big)
    assert any(e == 0 for layer, e in errors.items() if layer.removeprefix("model.") not in big)
