"""The transformer family: a causal GPT-style LM through the same Task as the LSTM, LayerNorm kept in FP32 in the
FP16-weight modes, its fused attention emulated in FP16 on a CPU."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mptrain.data import TextSpec
from mptrain.errors import UserError
from mptrain.models import build_model
from mptrain.precision import Precision
from mptrain.precision.emulation import EmulatedKernels

SPEC = TextSpec(name="t", vocab_size=20, level="char")
TINY = {"name": "transformer", "width": 16, "heads": 2, "layers": 2, "context": 16}


def _model(**overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(OmegaConf.create({**TINY, **overrides}), SPEC)


def test_shapes_tied_head_and_no_carried_state():
    model = _model()
    logits, state = model(torch.randint(0, 20, (3, 10)), model.initial_state(3, torch.device("cpu")))
    assert logits.shape == (3, 10, 20) and state is None
    assert model.decoder.weight is model.embedding.weight


def test_attention_is_causal():
    """A token's logits do not depend on later tokens."""
    model = _model().eval()
    x = torch.randint(0, 20, (1, 12))
    changed = x.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 20
    a, b = model(x)[0], model(changed)[0]
    assert torch.allclose(a[0, :8], b[0, :8]) and not torch.allclose(a[0, 8:], b[0, 8:])


def test_width_must_divide_by_heads_and_bptt_fit_the_context(compose_cfg, tmp_path):
    with pytest.raises(UserError, match="multiple of model.heads"):
        _model(width=18, heads=4)
    from mptrain.build import build_trainer

    cfg = compose_cfg("model=transformer", "dataset=synthetic_text", "dataset.bptt=32", "model.context=16",
                      "model.width=16", "trainer.device=cpu")
    with pytest.raises(UserError, match="dataset.bptt=32 is longer than model.context=16"):
        build_trainer(cfg, torch.device("cpu"), tmp_path, None)


@pytest.mark.parametrize("mode", ["fp16_master", "mixed", "fp16_naive"])
def test_layernorm_stays_fp32_and_hands_fp16_on(compose_cfg, mode):
    precision = Precision(compose_cfg(f"precision={mode}", "trainer.device=cpu").precision, torch.device("cpu"))
    model = precision.prepare(_model())
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float16
    seen = []
    norms[0].register_forward_hook(lambda _m, args, out: seen.append((args[0].dtype, out.dtype)))
    with precision.kernels():
        model(torch.randint(0, 20, (2, 8)))
    assert seen == [(torch.float32, torch.float16)]  # FP32 math inside, FP16 to the next layer


def test_keep_batchnorm_fp32_false_still_turns_norms_off(compose_cfg):
    cfg = compose_cfg("precision=mixed", "precision.keep_batchnorm_fp32=false", "trainer.device=cpu")
    model = Precision(cfg.precision, torch.device("cpu")).prepare(_model())
    assert all(m.weight.dtype == torch.float16 for m in model.modules() if isinstance(m, nn.LayerNorm))


def test_emulated_attention_matches_native_fp16(compose_cfg):
    """The fused attention, forward and backward, emulated: FP16 values in and out, close to torch's own FP16
    kernel (only the order of FP32 sums differs)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 16, 8).half().requires_grad_() for _ in range(3))

    def attend(emulate: bool):
        for t in (q, k, v):
            t.grad = None
        mode = EmulatedKernels() if emulate else torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x)
        with mode:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            out.float().square().sum().backward()
        return out, [t.grad.clone() for t in (q, k, v)], getattr(mode, "calls", None)

    native, native_grads, _ = attend(False)
    emulated, emulated_grads, calls = attend(True)
    assert calls >= 2 and emulated.dtype == torch.float16  # forward and backward kernels were emulated
    assert torch.allclose(emulated.float(), native.float(), atol=2e-3, rtol=2e-3)
    for a, b in zip(emulated_grads, native_grads):
        assert a.dtype == torch.float16 and torch.allclose(a.float(), b.float(), atol=5e-3, rtol=5e-3)
