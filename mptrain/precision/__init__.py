"""The paper's techniques: precision modes, FP32 master weights, loss scaling.

The trainer calls this package, never the other way round:

    precision = Precision(cfg.precision, device)
    model = precision.prepare(model)                 # storage dtype, BN in FP32
    stepper = precision.stepper(model, make_opt, make_sched, max_grad_norm)
    with precision.kernels(), precision.autocast():
        loss = ...
    stepper.backward(loss); applied = stepper.step()
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mptrain.errors import UserError
from mptrain.precision import emulated_layers, emulation
from mptrain.precision.attention import FP32Attention
from mptrain.precision.casting import cast_model
from mptrain.precision.emulation import EmulatedKernels, emulates
from mptrain.precision.modes import MODES, ModeSpec
from mptrain.precision.scaler import GradScalerAdapter, LossScaleCollapsed, LossScaler, Scaler
from mptrain.precision.stepper import PrecisionStepper
from mptrain.schema import typed

__all__ = ["MODES", "ModeSpec", "GradScalerAdapter", "LossScaler", "LossScaleCollapsed", "Precision",
           "PrecisionStepper", "Scaler"]


class Precision:
    def __init__(self, cfg, device: torch.device):
        cfg = typed("precision", cfg)  # a partial config takes the schema's defaults; bad values: one line
        self.cfg = cfg
        self.spec: ModeSpec = MODES[cfg.mode]
        self.device = device
        if device.type == "cuda":
            # TF32 would silently change the fp32 control's arithmetic: off unless asked
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.allow_tf32)
            torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)
        self.notes: list[str] = []  # warnings the run prints once and records in summary.json
        self.fp8_report: dict | None = None  # precision=fp8: which layers run in FP8 (summary.json `fp8`)
        self.mx_report: dict | None = None  # precision=mx: which layers run in which block format (summary.json `mx`)
        self._weights: list[torch.Tensor] = []  # the prepared networks' parameters
        self._layers = 0  # layers that compute their emulated products themselves (emulated_layers.py)
        self._coverage: emulated_layers.Coverage | None = None
        low = self.spec.arithmetic_dtype
        policies = {torch.float16: cfg.cpu_fp16, torch.bfloat16: cfg.cpu_bf16}
        resolved = {dtype: emulates(policy, device, dtype) for dtype, policy in policies.items()}
        #: the dtype whose products run in the emulated kernels (None: torch's own kernels, or none at all)
        self.emulated_dtype = low if low is not None and resolved[low] else None
        self.emulate = self.emulated_dtype is not None
        kernels = ("emulated" if self.emulate else "native") if low is not None else None
        #: which kernels the FP16 (BF16) arithmetic runs on (summary.json `fp16_kernels`, `bf16_kernels`)
        self.fp16_kernels = kernels if low == torch.float16 else None
        self.bf16_kernels = kernels if low == torch.bfloat16 else None
        #: cpu_bf16=auto on a CPU with BF16 units: torch's BF16 kernels, the attention in FP32 from BF16 values
        self.fp32_attention = (device.type == "cpu" and low == torch.bfloat16 and not self.emulate
                               and cfg.cpu_bf16 == "auto")
        #: the CPU's policies as resolved, for every mode alike: the report's setting, shared by a sweep's fp32 control
        self.cpu_fp16, self.cpu_bf16 = (None if device.type != "cpu" else ("emulate" if resolved[dtype] else "native")
                                        for dtype in (torch.float16, torch.bfloat16))
        lowered = [f"precision.{k}=fp16" for k in ("accumulate", "reductions") if cfg[k] == "fp16"]
        if lowered and not self.emulate:  # the schema refused cpu_fp16=native and modes without FP16 arithmetic
            raise UserError(f"{' and '.join(lowered)} run inside the emulated FP16 kernels, which a CPU runs; on "
                            f"{device.type} use precision.accumulate=fp32 reductions=fp32 (a GPU's own FP16 "
                            "kernels accumulate in FP32)")
        #: the paper's third technique as run (summary.json `arithmetic`); None: the mode has no FP16 products
        self.arithmetic = None if not self.spec.uses_fp16 else {
            "accumulate": cfg.accumulate, "accumulate_block": cfg.accumulate_block if cfg.accumulate == "fp16" else None,
            "reductions": cfg.reductions,
            # the norms' weights and statistics where the weights are 16-bit (fp16_naive_norm16: in FP16 too)
            "norms": None if not self.spec.low_precision_params else
            "fp32" if cfg.keep_norm_fp32 and cfg.keep_batchnorm_fp32 else "fp16"}
        if device.type == "cpu" and low is not None and policies[low] == "native" and not emulation.native_is_fast(low):
            name, slow = ("fp16", "10-100x") if low == torch.float16 else ("bf16", "1.5-3x")
            why = ("this CPU's FP16 units speed torch's FP16 matrix products but not its convolutions or recurrent "
                   "layers" if emulation.cpu_has_units(low) else f"this CPU has no {name.upper()} arithmetic")
            self.notes.append(
                f"precision={self.spec.name} with precision.cpu_{name}=native is slow: {why}, so torch's {name} "
                f"kernels run up to {slow} slower than fp32 (the numerics are the same; precision.cpu_{name}=auto, "
                f"the default, computes them from the same {name.upper()} values at FP32 speed)"
            )

    @property
    def mode(self) -> str:
        return self.spec.name

    def prepare(self, model: nn.Module, network: str | None = None) -> nn.Module:
        """Move and cast one network (`network`: its name where a task trains several, e.g. the GAN's g and d)."""
        model = model.to(self.device)
        model = cast_model(model, self.spec.param_dtype, self.cfg.keep_norm_fp32 and self.cfg.keep_batchnorm_fp32)
        self._weights += list(model.parameters())  # the emulated kernels' FP32 copies are made once per step
        if self.emulate and self.cfg.accumulate == "fp16" and any(isinstance(m, nn.RNNBase) for m in model.modules()):
            self.notes.append("precision.accumulate=fp16: the recurrent layers run as one fused FP16 kernel "
                              "(emulation.low_recurrence) whose gate products accumulate in FP32 inside; only the "
                              "model's other products (embedding, decoder, convolutions) accumulate in FP16")
        if self.spec.fp8:
            from mptrain.precision import fp8

            report = fp8.convert(model, self.cfg.fp8_recipe, self.device, prefix=f"{network}." if network else "")
            self.fp8_report = fp8.merge(self.fp8_report, report)
            self.notes.append(fp8.describe(report, network))
        if self.spec.mx:
            from mptrain.precision import fp8, mx

            report = mx.convert(model, self.cfg, prefix=f"{network}." if network else "")
            self.mx_report = fp8.merge(self.mx_report, report)
            self.notes.append(mx.describe(report, network))
        if (self.emulate and self._plain_products and self.cfg.emulated_products == "auto"
                and not (self.spec.fp8 or self.spec.mx)):
            self._layers += emulated_layers.install(model)
            self._coverage = None  # audited afresh with the new network
        return model

    @property
    def _plain_products(self) -> bool:
        """FP32 accumulation and reductions: the emulated products are all that differs from torch's kernels."""
        return self.cfg.accumulate != "fp16" and self.cfg.reductions != "fp16"

    @property
    def emulation_path(self) -> str | None:
        """summary.json `emulation`: where the emulated products ran ("layers": in the model's Linear and
        convolution layers; "dispatch mode": a TorchDispatchMode around every op); None without emulation."""
        if not self.emulate:
            return None
        return self._coverage.path if self._coverage is not None else "dispatch mode"

    def autocast(self):
        if self.spec.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.spec.autocast_dtype)

    def kernels(self):
        """Where forward and backward run: emulated tensor-core kernels under cpu_fp16 (cpu_bf16)=emulate; torch's
        BF16 kernels with the attention in FP32 from BF16 values under cpu_bf16=auto (precision/attention.py)."""
        if self.fp32_attention:
            return FP32Attention()
        if not self.emulate:
            return contextlib.nullcontext()
        block = self.cfg.accumulate_block if self.cfg.accumulate == "fp16" else None
        if self._coverage is None:
            self._coverage = emulated_layers.Coverage(self._layers)
        dispatch = self._coverage.dispatch_next()
        return EmulatedKernels(self.emulated_dtype, accumulate_block=block, fp16_reductions=self.cfg.reductions == "fp16",
                               weights=self._weights, dispatch=dispatch, on_exit=self._coverage.record,
                               attention=self._coverage.routes_attention(dispatch))

    def stepper(self, model, make_optimizer, make_scheduler=None, max_grad_norm=None,
                agree_on_overflow=None) -> PrecisionStepper:
        scale = self.cfg.loss_scale
        scaler = None
        if scale is not None and self.spec.name == "amp" and scale == "dynamic":
            scaler = GradScalerAdapter(torch.amp.GradScaler(
                self.device.type,
                init_scale=self.cfg.init_scale,
                growth_factor=self.cfg.growth_factor,
                backoff_factor=self.cfg.backoff_factor,
                growth_interval=self.cfg.growth_interval,
            ))
        elif scale is not None:
            dynamic = scale == "dynamic"
            scaler = LossScaler(
                init_scale=self.cfg.init_scale if dynamic else float(scale),
                dynamic=dynamic,
                growth_factor=self.cfg.growth_factor,
                backoff_factor=self.cfg.backoff_factor,
                growth_interval=self.cfg.growth_interval,
                hysteresis=self.cfg.hysteresis,
                min_scale=self.cfg.min_scale,
                device=self.device,
                max_consecutive_skips=self.cfg.max_consecutive_skips,
            )
        return PrecisionStepper(
            model,
            make_optimizer,
            make_scheduler,
            master_weights=self.spec.master_weights,
            scaler=scaler,
            max_grad_norm=max_grad_norm,
            agree_on_overflow=agree_on_overflow,
        )
