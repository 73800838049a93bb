"""Block-scaled formats (OCP MX: MXFP8, MXFP6, MXFP4; NVIDIA's NVFP4): quantize, then dequantize, in FP32.

A block of `block_size` consecutive values along the product's contraction dimension shares one scale: MX's is a
power of two (E8M0) from the block's amax, NVFP4's an E4M3 number times one FP32 scale for the whole tensor.
Each value is then rounded to the element format (E4M3, E5M2, E3M2, E2M3, E2M1), saturating at its max.

torchao's `MXTensor.to_mx` / `NVFP4Tensor.to_nvfp4` do the common case (1-D blocks, round-to-nearest) and are
used for it. What they do not do on a CPU is written here, in one function (`_blocks_qdq`), and tested against
them bit for bit where both apply (tests/test_blockfmt.py): stochastic rounding of the elements (NVIDIA's NVFP4
recipe rounds gradients so), 2-D weight tiles (block_size x block_size values sharing a scale, so a weight and
its transpose quantize alike), and the per-block statistics the numerics instrument records.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from mptrain.errors import UserError
from mptrain.schema.precision import BLOCK_FORMATS


@dataclass(frozen=True)
class ElementFormat:
    name: str
    ebits: int
    mbits: int
    max: float

    @property
    def emin(self) -> int:  # exponent of the smallest normal number
        return 2 - 2 ** (self.ebits - 1)

    @property
    def max_pow2(self) -> int:  # floor(log2(max)): torchao's target_max_pow2
        return int(torch.tensor(self.max).log2().floor())


E4M3 = ElementFormat("e4m3", 4, 3, 448.0)
ELEMENTS = {"e4m3": E4M3, "e5m2": ElementFormat("e5m2", 5, 2, 57344.0), "e3m2": ElementFormat("e3m2", 3, 2, 28.0),
            "e2m3": ElementFormat("e2m3", 2, 3, 7.5), "e2m1": ElementFormat("e2m1", 2, 1, 6.0)}  # fmt: skip


@dataclass(frozen=True)
class BlockFormat:
    name: str
    element: ElementFormat
    block_size: int  # the format's own (MX 32, NVFP4 16); precision.block_size may change it for MX
    scale: str  # "e8m0" (power of two) | "e4m3" (NVFP4: E4M3 block scale x FP32 tensor scale)


FORMATS = {
    "mxfp8_e4m3": BlockFormat("mxfp8_e4m3", E4M3, 32, "e8m0"),
    "mxfp8_e5m2": BlockFormat("mxfp8_e5m2", ELEMENTS["e5m2"], 32, "e8m0"),
    "mxfp6_e3m2": BlockFormat("mxfp6_e3m2", ELEMENTS["e3m2"], 32, "e8m0"),
    "mxfp6_e2m3": BlockFormat("mxfp6_e2m3", ELEMENTS["e2m3"], 32, "e8m0"),
    "mxfp4": BlockFormat("mxfp4", ELEMENTS["e2m1"], 32, "e8m0"),
    "nvfp4": BlockFormat("nvfp4", ELEMENTS["e2m1"], 16, "e4m3"),
}
assert tuple(FORMATS) == BLOCK_FORMATS, "the schema's list of block formats and this table must agree"
E8M0_BIAS = 127
E4M3_SCALE_MIN = 2.0**-6  # the E4M3 block scale's floor: its smallest normal (torchao clamps up to it)
F32_MIN_NORMAL = 2.0**-126
#: per quantized operand: values, non-zero values, flushed (non-zero -> 0), saturated (clamped at the element
#: max), blocks, blocks whose scale was clamped at the scale format's floor / ceiling, squared error, squared norm
STATS = ("count", "nonzero", "flushed", "saturated", "blocks", "scale_underflow", "scale_saturated", "sq_error",
         "sq_norm")  # fmt: skip


def round_to_element(v: torch.Tensor, element: ElementFormat, stochastic: bool = False) -> torch.Tensor:
    """`v` (FP32, already within +-max) rounded to the element format's grid: to nearest, ties to even (the cast
    torch and torchao do), or stochastically (up with probability equal to the distance from the value below)."""
    exponent = (torch.frexp(v).exponent - 1).clamp_min(element.emin)  # floor(log2|v|), the subnormals' below emin
    ulp = torch.ldexp(torch.ones_like(v), exponent - element.mbits)
    steps = v / ulp  # exact: ulp is a power of two
    steps = torch.floor(steps + torch.rand_like(steps)) if stochastic else torch.round(steps)
    return (steps * ulp).clamp(-element.max, element.max)


def _e8m0_exponent(amax: torch.Tensor, element: ElementFormat, rounding: str) -> torch.Tensor:
    """The shared power-of-two exponent of each block, as torchao's `to_mx` computes it for `rounding`."""
    if rounding == "rceil":  # NVIDIA's: the smallest power of two that fits amax under the element max
        return torch.ceil(torch.log2(amax / element.max)).clamp(-E8M0_BIAS, E8M0_BIAS).to(torch.int32)
    bits = amax.view(torch.int32)
    if rounding == "even":  # round amax to the element's mantissa first, then floor
        bits = (bits + (1 << (23 - element.mbits - 1))) & (0x1FF << 23)
    exponent = ((bits >> 23) & 0xFF) - E8M0_BIAS
    if rounding == "ceil":
        exponent = exponent + ((bits & 0x7FFFFF) > 0).int()
    return (exponent - element.max_pow2).clamp(-E8M0_BIAS, E8M0_BIAS + 1)


def _blocks_qdq(blocks: torch.Tensor, fmt: BlockFormat, rounding: str, stochastic: bool,
                tensor_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, B) FP32 blocks -> (their dequantized values, [blocks, scale_underflow, scale_saturated, saturated])."""
    element = fmt.element
    amax = blocks.abs().amax(-1, keepdim=True)
    if fmt.scale == "e8m0":
        exponent = _e8m0_exponent(amax, element, rounding)
        low, high = exponent <= -E8M0_BIAS, exponent > E8M0_BIAS
        scale = torch.ldexp(torch.ones_like(amax), exponent.clamp(max=E8M0_BIAS)).clamp_min(F32_MIN_NORMAL)
        scaled = blocks * torch.exp2(-exponent.float()) if rounding == "rceil" else blocks / scale
    else:  # NVFP4: the block scale in E4M3, relative to the tensor's FP32 scale
        wanted = amax / element.max / tensor_scale
        low, high = (wanted < E4M3_SCALE_MIN) & (amax > 0), wanted > E4M3.max
        block_scale = wanted.clamp(E4M3_SCALE_MIN, E4M3.max).to(torch.float8_e4m3fn).float()
        scaled = blocks * ((1.0 / tensor_scale) / block_scale)
        scale = block_scale * tensor_scale
    saturated = (scaled.abs() > element.max).sum()
    q = round_to_element(scaled.clamp(-element.max, element.max), element, stochastic)
    counts = torch.stack([torch.tensor(float(blocks.shape[0]), device=blocks.device),
                          (low & (amax > 0)).sum().float(), high.sum().float(), saturated.float()])  # fmt: skip
    return q * scale, counts


def nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's FP32 per-tensor scale: the tensor's amax over the largest block scale times the element max
    (torchao's `per_tensor_amax_to_scale`)."""
    return (x.detach().abs().amax().float() / (E4M3.max * 6.0)).clamp_min(torch.finfo(torch.float32).tiny)


def qdq(x: torch.Tensor, fmt: BlockFormat, block_size: int | None = None, rounding: str = "floor",
        stochastic: bool = False, tiles: bool = False, with_stats: bool = False):
    """`x` (2-D) quantized to `fmt` in blocks along its last dimension (`tiles`: square tiles of block_size^2),
    then dequantized to FP32; with `with_stats`, also its statistics (STATS, on the device). The last dimension
    (both, for tiles) must divide by the block size: callers keep layers that do not fit in high precision, and
    pad token dimensions with zeros."""
    size = block_size or fmt.block_size
    x32 = x.detach().float().contiguous()
    rows, cols = x32.shape
    if tiles:
        blocks = x32.reshape(rows // size, size, cols // size, size).transpose(1, 2).reshape(-1, size * size)
    else:
        blocks = x32.reshape(-1, size)
    tensor_scale = nvfp4_tensor_scale(x32) if fmt.scale == "e4m3" else None
    if not tiles and not stochastic and _torchao_fits(fmt, size):
        deq = _torchao_qdq(x32, fmt, size, rounding, tensor_scale)
        if not with_stats:
            return deq
        _, counts = _blocks_qdq(blocks, fmt, rounding, False, tensor_scale)  # the statistics: same arithmetic
    else:
        deq, counts = _blocks_qdq(blocks, fmt, rounding, stochastic, tensor_scale)
        if tiles:
            deq = deq.reshape(rows // size, cols // size, size, size).transpose(1, 2)
        deq = deq.reshape(rows, cols)
    if not with_stats:
        return deq
    nonzero = x32 != 0
    stats = torch.stack([torch.tensor(float(x32.numel()), device=x32.device), nonzero.sum().float(),
                         (nonzero & (deq == 0)).sum().float(), counts[3], counts[0], counts[1], counts[2],
                         (deq - x32).square().sum(), x32.square().sum()])  # fmt: skip
    return deq, stats


def _torchao_fits(fmt: BlockFormat, size: int) -> bool:
    return fmt.scale == "e8m0" or size == 16  # torchao's NVFP4 takes blocks of 16 only


@functools.cache
def _torchao():
    """torchao's MX classes, imported once; torch logs a deprecation for each Enum torchao registers with pytree
    (torchao's to fix, nothing a user can act on), so that logger is quiet for the import."""
    quiet = logging.getLogger("torch.utils._pytree")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    except ImportError:
        raise UserError("precision=mx needs torchao: pip install 'mptrain[lowp]' (or torchao)") from None
    finally:
        quiet.setLevel(level)
    return ScaleCalculationMode, MXTensor, NVFP4Tensor


def _torchao_qdq(x32: torch.Tensor, fmt: BlockFormat, size: int, rounding: str,
                 tensor_scale: torch.Tensor | None) -> torch.Tensor:
    ScaleCalculationMode, MXTensor, NVFP4Tensor = _torchao()
    if fmt.scale == "e4m3":
        return NVFP4Tensor.to_nvfp4(x32, per_tensor_scale=tensor_scale).dequantize(torch.float32)
    mode = ScaleCalculationMode(rounding)
    return MXTensor.to_mx(x32, _torchao_elem_dtype(fmt), size, scaling_mode=mode).dequantize(torch.float32)


def _torchao_elem_dtype(fmt: BlockFormat):
    _torchao()
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2

    return {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e3m2": DTYPE_FP6_E3M2,
            "e2m3": DTYPE_FP6_E2M3, "e2m1": torch.float4_e2m1fn_x2}[fmt.element.name]  # fmt: skip


def hadamard(size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A random Hadamard transform of `size` (a power of two): Sylvester's Hadamard matrix, scaled to be
    orthonormal, times random signs (NVIDIA's NVFP4 recipe applies one of 16 to the weight-gradient product's
    operands along the contraction dimension: outliers spread over the block, the product is unchanged)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (size,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return (h * signs / size**0.5).to(device)
