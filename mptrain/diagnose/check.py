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
    # per parameter, the share of its gradient values that exact arithmetic makes zero (FP32 rounding noise, found
    # by recomputing the batch in FP64): counted as zero, so they never decide the loss scale
    exact_zeros: dict[str, float] = field(default_factory=dict)
    exact_zeros_note: str = ""

    def answer(self) -> str:
        """The answer in a few lines, before any table."""
        scale = f"precision.loss_scale={self.loss_scale:g}" if self.loss_scale is not None else \
            "no static scale fits: use dynamic scaling (precision=mixed)"  # fmt: skip
        lines = [f"FP16 loss scale: {scale} ({self.loss_scale_reason})",
                 f"first module whose FP16 output overflows: {self.first_fp16_overflow or 'none'}"
                 + (f"; within 16x of 65504: {', '.join(self.near_fp16_limit)}" if self.near_fp16_limit else ""),
                 f"weight gradients FP16 flushes to zero unscaled: {100 * self.flushed_frac:.2f} %",
                 f"Linear layers to keep in bf16 under FP8: {', '.join(self.fp8_keep_bf16) or 'none'}"]
        if self.exact_zeros:
            shown = ", ".join(f"{name} {100 * share:.2f} %" for name, share in list(self.exact_zeros.items())[:6])
            more = f" and {len(self.exact_zeros) - 6} more" if len(self.exact_zeros) > 6 else ""
            lines.append(f"gradient values that are zero in exact arithmetic (FP32 rounding noise: their FP64 "
                         f"recomputation is under 1/1024 of them), counted as zero and not deciding the scale: "
                         f"{shown}{more}")
        if self.exact_zeros_note:
            lines.append(self.exact_zeros_note)
        return "\n".join(lines)

    def __str__(self) -> str:
        from mptrain.diagnose.cli import print_report

        out = io.StringIO()
        print_report(self.analysis, "all", out=out)
        return f"{self.answer()}\n\nper layer:\n{out.getvalue()}"


def check(model: nn.Module, batch, loss_fn=None, coverage: float = 0.999, headroom: float = 8.0,
          exact_zeros: bool = True) -> NumericsAnswer:
    """`batch` is (inputs, targets); `loss_fn(output, targets)` defaults to cross-entropy over the last dimension
    (a classifier's (B, C) logits or a language model's (B, T, V)); a Hugging Face output's `.logits` is taken.
    `exact_zeros`: recompute the batch in FP64 and count gradient values that are FP32 rounding noise around an
    exact zero (a key projection's bias under softmax, which is shift-invariant) as zero, so they cannot decide the
    loss scale; it costs one FP64 forward and backward of a second copy."""
    from mptrain.diagnose.cli import analyse
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
    rng = torch.get_rng_state()  # both passes draw the same dropout masks
    reference = _fp64_gradients(model, inputs, targets, loss_fn) if exact_zeros else None
    torch.set_rng_state(rng)
    zeroed, handles = {}, []
    if reference is not None:  # registered before the probe's hooks, so the probe records the cleaned gradient
        for name, p in net.named_parameters():
            if p.requires_grad and name in reference:
                handles.append(p.register_hook(_drop_exact_zeros(reference[name], name, zeroed)))
    try:
        with tempfile.TemporaryDirectory(prefix="mptrain-check-") as tmp:
            probe = NumericsProbe(every=1, run_dir=tmp, activations=True)
            with probe.capture({"model": net}, {"model": stepper}):
                loss = _loss(net, inputs, targets, loss_fn)
                loss.backward()
            sums = {k: v for k, v in probe.take().items() if k[0] != "lost_update"}  # no optimizer step was taken
    finally:
        for handle in handles:
            handle.remove()
    note = ""
    if reference is not None and zeroed.pop("__mismatch__", None):
        note = ("the FP64 recomputation did not match the FP32 gradients (a layer that draws differently per "
                "dtype?): no value was counted as an exact zero")
        zeroed.clear()
    result = analyse(sums, 1, coverage, headroom)
    advice = result["recommended"].get("model", {})
    weight = result["overall"].get("weight", {})
    near = [r["layer"] for r in result["forward"] if r["within16x_fp16_frac"] > 0]
    return NumericsAnswer(loss_scale=advice.get("scale"), loss_scale_reason=advice.get("reason", "no gradients"),
                          first_fp16_overflow=result["first_fp16_overflow"], near_fp16_limit=near,
                          flushed_frac=weight.get("flushed_frac", 0.0), fp8_keep_bf16=result["fp8_keep_bf16"],
                          analysis=result, exact_zeros={k: v for k, v in zeroed.items() if v > 0},
                          exact_zeros_note=note)


NOISE = 2.0**-10  # an FP32 value whose FP64 recomputation is under 1/1024 of it is > 99.9 % rounding error


def _loss(net: nn.Module, inputs, targets, loss_fn) -> torch.Tensor:
    output = net(inputs)
    output = getattr(output, "logits", output)
    output = output[0] if isinstance(output, (tuple, list)) else output
    loss = (loss_fn or _cross_entropy)(output, targets)
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise UserError("the loss must be one number: give loss_fn(output, targets) -> a scalar tensor")
    return loss


def _fp64_gradients(model: nn.Module, inputs, targets, loss_fn) -> dict[str, torch.Tensor] | None:
    """The batch's gradients computed in FP64 on a copy: the reference that tells an exact zero from a small value
    (None where the model does not run in FP64)."""
    net = copy.deepcopy(model).double().train()
    x = inputs.double() if torch.is_tensor(inputs) and inputs.is_floating_point() else inputs
    try:
        _loss(net, x, targets, loss_fn).backward()
    except (RuntimeError, TypeError):  # an op without an FP64 kernel: no reference, nothing dropped
        return None
    return {name: p.grad.detach() for name, p in net.named_parameters() if p.requires_grad and p.grad is not None}


def _drop_exact_zeros(exact: torch.Tensor, name: str, zeroed: dict):
    """A gradient hook: values whose FP64 counterpart is under NOISE of them become 0, and their share is noted."""
    def hook(grad):
        if grad.shape != exact.shape:
            return None
        reference = exact.to(grad.dtype)
        scale = grad.abs().max()
        if scale > 0 and (grad - reference).abs().max() > 1e-2 * scale:  # not the same computation
            zeroed["__mismatch__"] = True
            return None
        noise = (grad != 0) & (exact.abs() < NOISE * grad.abs())
        zeroed[name] = float(noise.float().mean())
        return torch.where(noise, torch.zeros_like(grad), grad)

    return hook


def _cross_entropy(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if output.shape[:-1] != targets.shape:
        raise UserError(f"the output {tuple(output.shape)} does not match targets {tuple(targets.shape)} for "
                        "cross-entropy over the last dimension; give loss_fn(output, targets)")
    return nn.functional.cross_entropy(output.flatten(0, -2), targets.flatten())
