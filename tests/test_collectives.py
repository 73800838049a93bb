"""The simulated all-reduce (mptrain/precision/collectives.py): its orders by hand, its rounding bound, and real
gloo ranks reducing the same gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mptrain.precision.collectives import rounding_bound, roundings, simulated_all_reduce

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _grads(n: int, numel: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) * 10.0 ** torch.randint(-6, 1, (numel,), generator=g) for _ in range(n)]


def test_the_ring_adds_each_chunk_starting_after_its_owner():
    """4 ranks, 4 elements (one a chunk): chunk c is ((g[c+1] + g[c+2]) + g[c+3]) + g[c], each sum rounded."""
    grads = [torch.tensor([1.0, 300.0, 0.5, 7.0]) * (r + 1) + torch.tensor([0.01, 0.3, 1.7, -2.2]) * r for r in range(4)]
    got = simulated_all_reduce(grads, torch.bfloat16, "ring")
    for c in range(4):
        terms = [(grads[(c + k) % 4][c] / 4).to(torch.bfloat16) for k in range(1, 5)]
        running = terms[0]
        for t in terms[1:]:
            running = (running.float() + t.float()).to(torch.bfloat16)
        assert got[c] == running.float()


def test_the_tree_adds_in_pairs():
    grads = [torch.tensor([v]) for v in (1.0, 2.0**-9, 2.0**-9, 3.0, 5.0)]
    b = lambda x: torch.as_tensor(x).to(torch.bfloat16).float()  # noqa: E731
    t = [b(g.item() / 5) for g in grads]
    level1 = [b(t[0] + t[1]), b(t[2] + t[3]), t[4]]
    want = b(b(level1[0] + level1[1]) + level1[2])
    assert simulated_all_reduce(grads, torch.bfloat16, "tree").item() == want.item()
    assert roundings(5, "tree") == 3 and roundings(5, "ring") == 4 and roundings(1, "ring") == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ["ring", "tree"])
@pytest.mark.parametrize("n", [2, 7, 64])
def test_every_order_stays_within_the_recursive_summation_bound(dtype, order, n):
    grads = _grads(n, seed=n)
    exact = torch.stack([g.double() for g in grads]).mean(0)
    got = simulated_all_reduce(grads, dtype, order).double()
    bound = rounding_bound(grads, dtype, order).double()
    # FP16's subnormals round to an absolute grain, not a relative one: allow half its smallest step per rounding
    floor = 2.0**-25 * (roundings(n, order) + 1) if dtype == torch.float16 else 0.0
    assert ((got - exact).abs() <= bound + floor + 1e-30).all()


def test_fsdp_divides_an_fp16_reduction_around_the_square_root_of_the_ranks():
    from mptrain.precision.collectives import fsdp_fp16_predivide

    assert [fsdp_fp16_predivide(n) for n in (2, 8, 64, 96, 512)] == [2.0, 4.0, 8.0, 16.0, 32.0]
    grads = _grads(64, seed=3)
    exact = torch.stack([g.double() for g in grads]).mean(0)
    got = simulated_all_reduce(grads, torch.float16, "ring", predivide=8.0).double()
    bound = rounding_bound(grads, torch.float16, "ring", predivide=8.0).double() + 2.0**-25 * 65
    assert ((got - exact).abs() <= bound).all()


def test_a_bf16_ring_loses_more_than_a_tree_at_many_ranks():
    """The ring's error grows with N - 1 roundings in sequence, the tree's with log2 N: the reason the rank count
    matters at all (pytorch/pytorch#106395: BF16 reductions stable on 96 GPUs, diverging on 384)."""
    grads = _grads(256, numel=4000, seed=1)
    exact = torch.stack([g.double() for g in grads]).mean(0)
    error = {o: (simulated_all_reduce(grads, torch.bfloat16, o).double() - exact).norm() / exact.norm()
             for o in ("ring", "tree")}
    assert error["ring"] > 2 * error["tree"]
    assert error["ring"] < 256 * 2.0**-8  # and inside the bound's scale


def _rank(rank: int, world: int, init: str, dtype: torch.dtype, grads: list[torch.Tensor], out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mine = (grads[rank] / world).to(dtype)  # what DDP's compression hooks put on the wire
        dist.all_reduce(mine)
        out[rank] = mine.float()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_real_gloo_ranks_reduce_as_simulated(world, dtype, tmp_path):
    """2 ranks: one addition, so any order is the simulation's, bit for bit. 4 ranks: gloo's own order (its ring
    is chunked differently from NCCL's), within the rounding bound of either."""
    grads = _grads(world, numel=512, seed=world)
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'rendezvous'}", dtype, grads, out), nprocs=world, join=True)
    real = out[0]
    assert all(torch.equal(out[r], real) for r in range(world))  # every rank holds the same result
    simulated = simulated_all_reduce(grads, dtype, "ring")
    if world == 2:
        assert torch.equal(real, simulated)
    else:
        exact = torch.stack([g.double() for g in grads]).mean(0)
        bound = rounding_bound(grads, dtype, "ring").double() + (2.0**-25 * world if dtype == torch.float16 else 0)
        assert ((real.double() - exact).abs() <= bound).all()
        assert not math.isnan(float(real.sum()))
