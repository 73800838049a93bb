"""`mptrain.check(model, batch)`: the numerics answer for one network and one batch, from Python.

One FP32 forward and backward of a copy of the network (the caller's is left as it is) under the instruments
`mptrain-numerics` runs for K training steps (telemetry/numerics.py): each weight and activation gradient's
exponent histogram against FP16's range, each module output's headroom below FP16's 65504, each Linear layer's
operands under FP8 tensorwise scaling. The answer is `mptrain-numerics`' analysis of them, the same function.
"""

from __future__ import annotations

import copy
import io
import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from mptrain.errors import UserError


@dataclass
class NumericsAnswer:
    loss_scale: float | None  # the static scale to use; None: no static scale fits, use dynamic scaling
    loss_scale_reason: str
    first_fp16_overflow: str | None  # the first module (forward order) whose output exceeds 65504
    near_fp16_limit: list[str]  # module outputs within 16x (4 bits) of 65504
    flushed_frac: float  # share of non-zero weight gradients FP16 flushes to zero unscaled
    fp8_keep_bf16: list[str]  # Linear layers whose operands lose > 1 % of their values to FP8 underflow
    analysis: dict = field(repr=False)  # mptrain-numerics' full analysis (layers, histograms, FP8 records)

    def __str__(self) -> str:
        from mptrain.numerics_cli import print_report

        out = io.StringIO()
        print_report(self.analysis, "all", out=out)
        return out.getvalue()


def check(model: nn.Module, batch, loss_fn=None, coverage: float = 0.999, headroom: float = 8.0) -> NumericsAnswer:
    """`batch` is (inputs, targets); `loss_fn(output, targets)` defaults to cross-entropy over the last dimension
    (a classifier's (B, C) logits or a language model's (B, T, V)); a Hugging Face output's `.logits` is taken."""
    from mptrain.numerics_cli import analyse
    from mptrain.telemetry.numerics import NumericsProbe

    if not isinstance(model, nn.Module):
        raise UserError(f"mptrain.check takes a torch.nn.Module, not a {type(model).__name__}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise UserError("mptrain.check takes a batch (inputs, targets): e.g. next(iter(loader))")
    inputs, targets = batch
    net = copy.deepcopy(model).float().train()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters: nothing to check")
    inputs = inputs.float() if torch.is_tensor(inputs) and inputs.is_floating_point() else inputs
    stepper = SimpleNamespace(current_scale=None, params=params, masters=None, optimizer=None, pre_update_hooks=[])
    with tempfile.TemporaryDirectory(prefix="mptrain-check-") as tmp:
        probe = NumericsProbe(every=1, run_dir=tmp, activations=True)
        with probe.capture({"model": net}, {"model": stepper}):
            output = net(inputs)
            output = getattr(output, "logits", output)
            output = output[0] if isinstance(output, (tuple, list)) else output
            loss = (loss_fn or _cross_entropy)(output, targets)
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise UserError("the loss must be one number: give loss_fn(output, targets) -> a scalar tensor")
            loss.backward()
        sums = {k: v for k, v in probe.take().items() if k[0] != "lost_update"}  # no optimizer step was taken
    result = analyse(sums, 1, coverage, headroom)
    advice = result["recommended"].get("model", {})
    weight = result["overall"].get("weight", {})
    near = [r["layer"] for r in result["forward"] if r["within16x_fp16_frac"] > 0]
    return NumericsAnswer(loss_scale=advice.get("scale"), loss_scale_reason=advice.get("reason", "no gradients"),
                          first_fp16_overflow=result["first_fp16_overflow"], near_fp16_limit=near,
                          flushed_frac=weight.get("flushed_frac", 0.0), fp8_keep_bf16=result["fp8_keep_bf16"],
                          analysis=result)


def _cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if output.shape[:-1] != targets.shape:
        raise UserError(f"the output {tuple(output.shape)} does not match targets {tuple(targets.shape)} for "
                        "cross-entropy over the last dimension; give loss_fn(output, targets)")
    return nn.functional.cross_entropy(output.flatten(0, -2), targets.flatten())
