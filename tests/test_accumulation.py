"""precision.accumulate=fp16 and precision.reductions=fp16 against NumPy float16 references, bit for bit.

Each reference builds the products of a kernel in the order precision/accumulation.py documents, then runs the
running sum with NumPy: `acc = float16(float32(acc) + block_sum)`. Block sums of K > 1 terms are compared on values
with few significant bits (every FP32 block sum exact), so the BLAS's order inside a block cannot matter.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mptrain.precision import reductions
from mptrain.precision.emulation import EmulatedKernels


def running_sum(terms: np.ndarray, block: int) -> np.ndarray:
    """float32 terms [..., R] summed in blocks of `block`, the running sum rounded to float16 after each block."""
    acc = np.zeros(terms.shape[:-1], np.float16)
    for start in range(0, terms.shape[-1], block):
        block_sum = terms[..., start:start + block].sum(-1, dtype=np.float32)
        acc = (acc.astype(np.float32) + block_sum).astype(np.float16)
    return acc


def fp16(*shape, seed=0, coarse=False):
    """Random FP16 values; `coarse`: multiples of 1/16 in [-4, 4] (products and block sums exact in FP32)."""
    g = torch.Generator().manual_seed(seed)
    if coarse:
        return (torch.randint(-64, 65, shape, generator=g) / 16).half()
    return torch.randn(shape, generator=g).half()


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def equal_bits(got: torch.Tensor, want: np.ndarray) -> None:
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(got.detach().numpy().view(np.uint16), want.astype(np.float16).view(np.uint16))


CASES = [(1, False), (4, True), (32, True), (1000, True)]  # (block, coarse values)


@pytest.mark.parametrize("block, coarse", CASES)
def test_matmul_and_its_backward_products(block, coarse):
    x, w = fp16(6, 70, seed=1, coarse=coarse).requires_grad_(), fp16(5, 70, seed=2, coarse=coarse).requires_grad_()
    grad = fp16(6, 5, seed=3, coarse=coarse)
    with EmulatedKernels(accumulate_block=block) as mode:
        out = F.linear(x, w)
        out.backward(grad)
    assert mode.calls == 3
    xn, wn, gn = as_np(x), as_np(w), as_np(grad)
    equal_bits(out, running_sum(xn[:, None, :] * wn[None, :, :], block))  # over the shared (input) dimension
    equal_bits(x.grad, running_sum(gn[:, :, None].transpose(0, 2, 1) * wn.T[None], block))  # over outputs
    equal_bits(w.grad, running_sum(gn.T[:, None, :] * xn.T[None, :, :], block))  # over the batch


def test_addmm_adds_the_bias_in_fp32_after_the_fp16_product():
    x, w, b = fp16(4, 50, seed=1), fp16(3, 50, seed=2), fp16(3, seed=4)
    with EmulatedKernels(accumulate_block=1):
        out = F.linear(x, w, b)
    product = running_sum(as_np(x)[:, None, :] * as_np(w)[None], 1)
    equal_bits(out, (product.astype(np.float32) + as_np(b)).astype(np.float16))


def conv_reference(x, w, gy, stride, padding, block):
    """Forward, input gradient and weight gradient of a 2-D convolution in the documented orders (NumPy)."""
    n, c, h, width = x.shape
    o, _, kh, kw = w.shape
    s, p = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    oh, ow = gy.shape[2:]
    patches = np.stack([xp[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                        for i in range(kh) for j in range(kw)], 2)  # [N, C, taps, OH, OW]
    patches = patches.reshape(n, c * kh * kw, oh, ow)  # (channel, row, column), channel slowest
    terms = np.einsum("or,nryx->noyxr", w.reshape(o, -1), patches)
    forward = running_sum(terms, block)
    terms = np.einsum("noyx,nryx->ornyx", gy, patches).reshape(o, c * kh * kw, -1)
    weight_grad = running_sum(terms, block).reshape(w.shape)
    acc = np.zeros((n, c, h + 2 * p, width + 2 * p), np.float16)
    for i in range(kh):
        for j in range(kw):
            tap = np.einsum("oc,noyx->ncyxo", w[:, :, i, j], gy)  # [N, C, OH, OW, O]
            for start in range(0, o, block):
                block_sum = tap[..., start:start + block].sum(-1, dtype=np.float32)
                view = acc[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s]
                acc[:, :, i:i + s * (oh - 1) + 1:s, j:j + s * (ow - 1) + 1:s] = (
                    view.astype(np.float32) + block_sum).astype(np.float16)
    input_grad = acc[:, :, p:p + h, p:p + width]
    return forward, input_grad, weight_grad


@pytest.mark.parametrize("block, coarse", CASES[:3])
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_convolution_and_its_backward_products(block, coarse, stride, padding):
    x = fp16(2, 3, 7, 7, seed=1, coarse=coarse).requires_grad_()
    w = fp16(5, 3, 3, 3, seed=2, coarse=coarse).requires_grad_()
    with EmulatedKernels(accumulate_block=block):
        out = F.conv2d(x, w, stride=stride, padding=padding)
        grad = fp16(*out.shape, seed=3, coarse=coarse)
        out.backward(grad)
    forward, input_grad, weight_grad = conv_reference(as_np(x), as_np(w), as_np(grad), stride, padding, block)
    equal_bits(out, forward)
    equal_bits(x.grad, input_grad)
    equal_bits(w.grad, weight_grad)


def test_transposed_convolution_is_the_input_gradient_it_inverts():
    x, w = fp16(2, 5, 4, 4, seed=1), fp16(5, 3, 4, 4, seed=2)  # ConvTranspose2d(5, 3, 4, 2, 1): DCGAN's shape
    with EmulatedKernels(accumulate_block=1):
        out = F.conv_transpose2d(x, w, stride=2, padding=1)
    assert out.shape == (2, 3, 8, 8)
    _, input_grad, _ = conv_reference(np.zeros((2, 3, 8, 8), np.float32), as_np(w), as_np(x), 2, 1, 1)
    equal_bits(out, input_grad)


def test_a_large_block_matches_fp32_accumulation_to_one_fp16_rounding():
    x, w = fp16(8, 300, seed=5), fp16(7, 300, seed=6)
    with EmulatedKernels(accumulate_block=300):
        blocked = F.linear(x, w)
    with EmulatedKernels():
        plain = F.linear(x, w)
    torch.testing.assert_close(blocked, plain, rtol=0, atol=0)  # one block: the FP32 sum rounded once


def test_fp32_accumulation_is_todays_arithmetic_bit_for_bit():
    x, w = fp16(2, 3, 9, 9, seed=1), fp16(4, 3, 3, 3, seed=2)
    a, b = fp16(5, 40, seed=3), fp16(40, 6, seed=4)
    with EmulatedKernels():
        conv, mm = F.conv2d(x, w, padding=1), a @ b
    assert torch.equal(conv, F.conv2d(x.float(), w.float(), padding=1).half())
    assert torch.equal(mm, (a.float() @ b.float()).half())


def test_fp16_accumulation_loses_what_fp32_keeps():
    """A long sum of small terms onto a large one: the FP16 running sum stops growing (swamping)."""
    a = torch.full((1, 4096), 1.0).half()
    b = torch.full((4096, 1), 1.0).half()
    with EmulatedKernels(accumulate_block=1):
        sequential = (a @ b).item()
    with EmulatedKernels():
        exact = (a @ b).item()
    assert exact == 4096 and sequential == 2048  # 2048 + 1 rounds back to 2048 in FP16


def test_attention_decomposed_equals_fp32_attention_closely_and_runs_backward():
    q, k, v = (fp16(2, 2, 16, 8, seed=s).requires_grad_() for s in (1, 2, 3))
    with EmulatedKernels(accumulate_block=1) as mode:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
    assert mode.calls == 2
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    ref.sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for got, want in ((q.grad, qf.grad), (k.grad, kf.grad), (v.grad, vf.grad)):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


# ---- reductions -------------------------------------------------------------------------------------------------

def lanes_sum(x: np.ndarray) -> np.ndarray:
    """NumPy float16: term r to lane r mod 256, lanes summed in order, then a pairwise tree (the documented order)."""
    lanes = reductions.LANES
    x = x.astype(np.float16)
    rows = -(-x.shape[-1] // lanes)
    x = np.concatenate([x, np.zeros((*x.shape[:-1], rows * lanes - x.shape[-1]), np.float16)], -1)
    x = x.reshape(*x.shape[:-1], rows, lanes)
    acc = x[..., 0, :].copy()
    for r in range(1, rows):
        acc = acc + x[..., r, :]
    while acc.shape[-1] > 1:
        half = acc.shape[-1] // 2
        acc = acc[..., :half] + acc[..., half:]
    return acc[..., 0]


@pytest.mark.parametrize("length", [7, 256, 1000, 5000])
def test_fp16_sum_equals_numpy_float16(length):
    x = fp16(3, length, seed=length) * 8
    equal_bits(reductions.fp16_sum(x, -1), lanes_sum(x.numpy()))


def test_softmax_and_loss_mean_in_fp16_equal_numpy_float16():
    logits = fp16(5, 300, seed=1) * 4
    shifted = logits - logits.amax(-1, keepdim=True)
    e = shifted.exp()  # torch's FP16 exp (rounded from float): the reference takes the same values
    with EmulatedKernels(fp16_reductions=True) as mode:
        p = torch.softmax(logits, -1)
        logp = torch.log_softmax(logits, -1)
        target = torch.tensor([0, 5, 9, 299, 3])
        loss = F.nll_loss(logp, target)
    assert mode.calls == 3
    denominator = lanes_sum(e.numpy())[:, None]
    equal_bits(p, e.numpy() / denominator)
    equal_bits(logp, shifted.numpy() - np.log(denominator.astype(np.float32)).astype(np.float16))
    picked = -logp.detach().numpy()[np.arange(5), target.numpy()]
    equal_bits(loss, (lanes_sum(picked) / np.float16(5)))


def test_batch_norm_statistics_in_fp16_equal_numpy_float16():
    x = (fp16(4, 3, 10, 10, seed=2) * 3 + 1)
    bn = torch.nn.BatchNorm2d(3)
    with EmulatedKernels(fp16_reductions=True):
        out = bn(x)
    xn = x.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    mean = lanes_sum(xn) / np.float16(400)
    centred = xn - mean[:, None]
    var = lanes_sum(centred * centred) / np.float16(400)
    np.testing.assert_array_equal(bn.running_mean.numpy(), (0.1 * mean.astype(np.float32)).astype(np.float32))
    invstd = (var + np.float16(1e-5)) ** np.float16(-0.5)
    want = (x.float().numpy() - mean.astype(np.float32)[None, :, None, None]) * invstd.astype(np.float32)[None, :, None, None]
    np.testing.assert_allclose(out.detach().float().numpy(), want.astype(np.float16).astype(np.float32), atol=2e-3, rtol=2e-3)


def test_layer_norm_backward_in_fp16_matches_fp32_closely():
    x = fp16(6, 32, seed=3).float().requires_grad_()
    ln = torch.nn.LayerNorm(32)
    with EmulatedKernels(fp16_reductions=True) as mode:
        ln(x).pow(2).sum().backward()
    assert mode.calls == 2
    xf = x.detach().clone().requires_grad_()
    ref = torch.nn.LayerNorm(32)
    ref(xf).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, xf.grad, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(ln.weight.grad, ref.weight.grad, atol=5e-2, rtol=5e-2)


# ---- the settings, end to end -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, says", [
    (["precision=mixed", "precision.accumulate=fp8"], "precision.accumulate must be fp32 or fp16 (got 'fp8')"),
    (["precision=mixed", "precision.accumulate_block=0"], "precision.accumulate_block must be a positive integer"),
    (["precision=bf16", "precision.accumulate=fp16"], "precision.accumulate=fp16 concerns FP16 arithmetic, which "
                                                      "precision=bf16 has none of"),
    (["precision=fp32", "precision.reductions=fp16"], "precision.reductions=fp16 concerns FP16 arithmetic"),
    (["precision=mixed", "precision.reductions=fp16", "precision.cpu_fp16=native"],
     "precision.reductions=fp16 runs inside the emulated FP16 kernels"),
])
def test_bad_arithmetic_settings_are_one_line(compose_cfg, overrides, says):
    from mptrain import schema
    from mptrain.errors import UserError

    with pytest.raises(UserError) as refused:
        schema.validate(compose_cfg(*overrides))
    assert "\n" not in str(refused.value) and str(refused.value).startswith(says)


def test_on_cuda_the_setting_is_refused_in_one_line():
    from mptrain.errors import UserError
    from mptrain.precision import Precision

    with pytest.raises(UserError, match=r"^precision.accumulate=fp16 run inside the emulated FP16 kernels.*on cuda"):
        Precision({"mode": "mixed", "accumulate": "fp16"}, torch.device("cuda"))


@pytest.mark.e2e
def test_fp16_accumulation_trains_and_says_so_in_the_summary(tmp_path):
    from cli_helpers import TINY, mptrain, read_summary

    out = mptrain("model=mlp", "precision=mixed", "precision.accumulate=fp16", "precision.accumulate_block=1",
                  *TINY, "model.depth=3", "model.width=16", "trainer.max_steps=3", f"hydra.run.dir={tmp_path}/a",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(tmp_path / "a")
    assert summary["arithmetic"] == {"accumulate": "fp16", "accumulate_block": 1, "reductions": "fp32", "norms": "fp32"}
    assert "products accumulate in FP16, blocks of 1; reductions in FP32; norms in FP32" in out.stdout
    assert summary["env"]["git_commit"] and "torch" in summary["env"]["packages"]


@pytest.mark.e2e
def test_fp16_reductions_train_a_resnet_end_to_end(tmp_path):
    from cli_helpers import TINY, mptrain, read_summary

    out = mptrain("model=resnet", "precision=mixed", "precision.reductions=fp16", "precision.accumulate=fp16",
                  "precision.accumulate_block=32", *TINY, "trainer.max_steps=3", f"hydra.run.dir={tmp_path}/a",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(tmp_path / "a")
    assert summary["status"] == "completed" and summary["arithmetic"]["reductions"] == "fp16"
    assert "reductions in FP16" in out.stdout


@pytest.mark.parametrize("mode, keep, norms", [("fp16_naive", False, "fp16"), ("fp16_naive", True, "fp32"),
                                               ("mixed", True, "fp32"), ("amp", True, None)])
def test_the_summary_says_where_the_norms_ran(mode, keep, norms):
    """fp16_naive_norm16 (keep_norm_fp32=false in a preset) must be told apart from fp16_naive in the report; with
    FP32 weights (amp) the norms are the model's own and the field is None."""
    from mptrain.precision import Precision

    precision = Precision({"mode": mode, "keep_norm_fp32": keep}, torch.device("cpu"))
    assert precision.arithmetic["norms"] == norms


@pytest.mark.e2e
def test_the_accumulation_error_script_measures_each_arm_against_fp32_and_the_noise(tmp_path):
    """scripts/accumulation_error.py, behind repro_accumulation_transformer's rounding-error figures: one state,
    one batch, each arm's gradient against fp32's; FP32 accumulation's error is far below the next batch's."""
    from mptrain.scripts import accumulation_error

    table = tmp_path / "error.md"
    code = accumulation_error.main(["model=mlp", "model.width=32", "model.depth=3", "dataset=synthetic",
                                    "dataset.batch_size=16", "--arms", "mixed,mixed_accum16_seq", "--md", str(table)])
    assert code == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.read_text().splitlines()
            if line.startswith("| ") and "---" not in line}
    noise, mixed, sequential = (float(rows[k][1]) for k in ("fp32, the next batch (sampling noise)", "mixed",
                                                             "mixed_accum16_seq"))
    assert 0 < mixed < noise / 10 and 0 < sequential < noise


def test_the_accumulation_error_script_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    from mptrain.scripts import accumulation_error

    assert accumulation_error.main(["model=mlp", "--weights", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weights") and err.count("\n") == 1
    corrupt = tmp_path / "checkpoint.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert accumulation_error.main(["model=mlp", "--weights", str(corrupt)]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "give --weights a run's checkpoint.pt" in err and err.count("\n") == 1
