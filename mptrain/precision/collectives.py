"""What an all-reduce of the gradients in FP32, BF16 or FP16 does to them, for N ranks simulated in one process.

A data-parallel step averages N ranks' gradients with an all-reduce. In a reduced precision every partial sum is
rounded to the wire's dtype, so the result depends on the order of the additions, which is the algorithm's:

- **ring** (NCCL's and gloo's ring all-reduce: a reduce-scatter, then an all-gather that only copies): the flat
  gradient is cut into N chunks; chunk c starts at rank c+1 and travels the ring, each rank adding its own
  contribution to the partial sum it received, so chunk c is ((g[c+1] + g[c+2]) + ...) + g[c], rounded after
  every hop: N - 1 roundings in sequence.
- **tree** (NCCL's tree, chosen at large rank counts; a pairwise reduction): ranks are summed in pairs, the pairs
  in pairs, ..., rounded at each of the ceil(log2 N) levels.

Each addition is `dtype(fp32(a) + fp32(b))` (round to nearest even), as NCCL adds BF16 and FP16 and as torch's
own casts round. Each rank's contribution is divided by a factor before the reduction and cast to the wire's
dtype, the sum divided by the rest of N after it: all of N before, as DDP's compression hooks do
(`bf16_compress_hook`, `fp16_compress_hook`) and as NCCL's average pre-multiplies; for an FP16 reduce-scatter,
FSDP2 divides by the power of two nearest sqrt(N) before and the rest after (`fsdp_fp16_predivide`: neither the
terms nor the sum leave FP16's range). Real collectives differ in where a chunk boundary falls (DDP reduces 25 MB buckets, FSDP one
reduce-scatter per sharded block, NCCL pipelines a chunk in slices): the order within an element's sum is the
same rotation of ranks, which is all that rounding sees. Both orders obey the recursive-summation bound: the
rounded mean differs from the exact one by at most `rounding_bound` (Higham, Accuracy and Stability of Numerical
Algorithms, 2nd ed., eq. 4.4: gamma_k = k u / (1 - k u) times the sum of the terms' magnitudes, k the number of
roundings an element goes through in sequence, u the dtype's unit roundoff, plus the one rounding of each term).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

ORDERS = ("ring", "tree")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _add(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (a.float() + b.float()).to(dtype)


def simulated_all_reduce(grads: Sequence[torch.Tensor], dtype: torch.dtype, order: str = "ring",
                         predivide: float | None = None) -> torch.Tensor:
    """The mean of `grads` (one tensor per simulated rank, all of one shape) as an all-reduce in `dtype` computes it
    in `order` (ring or tree), returned in FP32; `predivide`: the part of N each term is divided by before the
    reduction (None: all of it), the sum being divided by the rest after."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = len(grads)
    before = float(n) if predivide is None else float(predivide)
    shape = grads[0].shape
    terms = torch.stack([g.reshape(-1).float() for g in grads]).div_(before).to(dtype)  # (n, numel) on the wire
    total = terms[0] if n == 1 else _ring(terms, dtype) if order == "ring" else _tree(terms, dtype)
    after = n / before
    return (total if after == 1 else (total.float() / after).to(dtype)).float().reshape(shape)


def fsdp_fp16_predivide(n: int) -> float:
    """FSDP2's division before an FP16 reduce-scatter over n ranks (torch's `_get_gradient_divide_factors`): the
    power of two p, doubling while it divides n and n / p > p."""
    p = 1
    while n % p == 0 and n / p > p:
        p *= 2
    return float(p)


def _ring(terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reduce-scatter around a ring: chunk c is summed by ranks c+1, c+2, ..., c in that order."""
    n, numel = terms.shape
    chunk = math.ceil(numel / n)
    padded = torch.zeros(n, n * chunk, dtype=dtype)
    padded[:, :numel] = terms
    by_chunk = padded.view(n, n, chunk)  # [rank, chunk, element]
    chunks = torch.arange(n)
    partial = by_chunk[(chunks + 1) % n, chunks]  # each chunk's first term, held by the rank after its owner
    for hop in range(2, n + 1):
        partial = _add(partial, by_chunk[(chunks + hop) % n, chunks], dtype)
    return partial.reshape(-1)[:numel]


def _tree(terms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Pairwise: rank 2i with 2i + 1 at each level; an odd one out waits for the next level."""
    level = terms
    while len(level) > 1:
        paired = _add(level[0:len(level) - 1:2], level[1::2], dtype)
        level = torch.cat([paired, level[-1:]]) if len(level) % 2 else paired
    return level[0]


def roundings(n: int, order: str) -> int:
    """The additions an element's sum goes through in sequence: N - 1 around a ring, ceil(log2 N) up a tree."""
    return n - 1 if order == "ring" else math.ceil(math.log2(n)) if n > 1 else 0


def rounding_bound(grads: Sequence[torch.Tensor], dtype: torch.dtype, order: str = "ring",
                   predivide: float | None = None) -> torch.Tensor:
    """Per element, the most the rounded mean can differ from the exact mean of `grads`: each term's cast to `dtype`
    (u |g_i| / N) and gamma_k over the sum of the terms' magnitudes for the k roundings in sequence (one more where
    part of N divides the sum after the reduction)."""
    u = UNIT_ROUNDOFF[dtype]
    n = len(grads)
    k = roundings(n, order) + (predivide is not None and float(predivide) != n)
    magnitude = torch.stack([g.reshape(-1).double().abs() for g in grads]).sum(0) / n
    gamma = k * u / (1 - k * u)
    # the terms are already rounded once (relative u) before the sums' k roundings act on them
    return ((u + gamma * (1 + u)) * magnitude).float().reshape(grads[0].shape)
