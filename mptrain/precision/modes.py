"""The precision modes, resolved in one place (README's and docs/modes.md's mode table).

| mode        | weights held      | forward/backward  | update            | default scale |
| fp32        | fp32              | fp32              | fp32              | none          |
| fp16_naive  | fp16              | fp16              | fp16 weights      | none          |
| fp16_master | fp16 + fp32 master| fp16              | fp32 master       | none          |
| mixed       | fp16 + fp32 master| fp16              | fp32 master       | dynamic       |
| amp         | fp32              | autocast fp16     | fp32              | GradScaler    |
| bf16        | fp32              | autocast bf16     | fp32              | none          |
| bf16_pure   | bf16              | bf16              | bf16, nearest     | none          |
| bf16_sr     | bf16              | bf16              | bf16, stochastic  | none          |
| bf16_kahan  | bf16              | bf16              | bf16 + Kahan comp.| none          |
| fp8         | fp32              | fp8 Linear + bf16 | fp32              | per-tensor    |
| mx          | fp32              | MX Linear + bf16  | fp32              | per-block     |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mptrain.schema.precision import BF16_ARITHMETIC, FP16_ARITHMETIC
from mptrain.schema.precision import MODES as MODE_NAMES


@dataclass(frozen=True)
class ModeSpec:
    name: str
    param_dtype: torch.dtype  # dtype the model's weights are held in
    autocast_dtype: torch.dtype | None  # torch.autocast dtype, None = no autocast
    master_weights: bool  # fp32 master copy updated by the optimizer
    update: str = "nearest"  # how an update reaches low-precision weights: nearest | stochastic | kahan
    fp8: bool = False  # Linear layers through torchao's Float8Linear (precision/fp8.py)
    mx: bool = False  # Linear layers' products in a block-scaled format (precision/mx.py)

    @property
    def low_precision_params(self) -> bool:
        return self.param_dtype != torch.float32

    @property
    def uses_fp16(self) -> bool:
        """FP16 products: the schema's list (its checks run before torch loads); a test holds it to the dtypes."""
        return self.name in FP16_ARITHMETIC

    @property
    def arithmetic_dtype(self) -> torch.dtype | None:
        """The dtype of the mode's low-precision products (None: FP32 only); a test holds the lists to the dtypes."""
        if self.uses_fp16:
            return torch.float16
        return torch.bfloat16 if self.name in BF16_ARITHMETIC else None


_SPECS = {
    "fp32": ModeSpec("fp32", torch.float32, None, False),
    "fp16_naive": ModeSpec("fp16_naive", torch.float16, None, False),
    "fp16_master": ModeSpec("fp16_master", torch.float16, None, True),
    "mixed": ModeSpec("mixed", torch.float16, None, True),
    "amp": ModeSpec("amp", torch.float32, torch.float16, False),
    "bf16": ModeSpec("bf16", torch.float32, torch.bfloat16, False),
    # the master weights' rivals: BF16 weights and arithmetic, no FP32 copy
    "bf16_pure": ModeSpec("bf16_pure", torch.bfloat16, None, False),
    "bf16_sr": ModeSpec("bf16_sr", torch.bfloat16, None, False, update="stochastic"),
    "bf16_kahan": ModeSpec("bf16_kahan", torch.bfloat16, None, False, update="kahan"),
    # FP8 products in the Linear layers (torchao float8, per-tensor scaling), bf16 autocast around them
    "fp8": ModeSpec("fp8", torch.float32, torch.bfloat16, False, fp8=True),
    # block-scaled products (MXFP8/6/4, NVFP4) in the Linear layers, bf16 autocast around them
    "mx": ModeSpec("mx", torch.float32, torch.bfloat16, False, mx=True),
}
# the names are the schema's (one list, torch-free); a mode without a spec fails here, at import, by name
MODES: dict[str, ModeSpec] = {name: _SPECS[name] for name in MODE_NAMES}
