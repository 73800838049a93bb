"""Speed options of the trainer: fused optimizer kernels, channels_last, torch.compile — same training, faster."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from mptrain.bench.measure import RecordingLogger
from mptrain.optim import kernel_choice
from mptrain.run import build_trainer

TINY_RESNET = ["model=resnet", "model.depth=8", "model.width=4", "dataset=synthetic", "dataset.image_size=8",
               "dataset.train_size=128", "dataset.batch_size=32", "trainer.device=cpu", "trainer.max_steps=4",
               "trainer.log_every=1", "precision=fp32"]  # fmt: skip


def _train(cfg):
    tb = RecordingLogger()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, torch.device("cpu"), Path(tmp), tb, None, [])
        trainer.fit(evaluate=False)
    return trainer, [v["train/loss"] for _, v in tb.points if "train/loss" in v]


def test_fused_kernels_update_fp32_weights_and_fp16_updates_stay_fp16():
    assert kernel_choice([torch.nn.Parameter(torch.zeros(2))]) == {"fused": True}
    # fp16_naive's update must do its arithmetic in FP16, as the paper's naive baseline does
    assert kernel_choice([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]) == {"foreach": True}


def test_channels_last_trains_as_the_default_layout_does(compose_cfg):
    default, losses = _train(compose_cfg(*TINY_RESNET))
    nhwc, nhwc_losses = _train(compose_cfg(*TINY_RESNET, "trainer.channels_last=true"))
    convs = [p for p in nhwc.task.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    torch.testing.assert_close(torch.tensor(nhwc_losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_trains_as_eager_does(compose_cfg):
    _, eager = _train(compose_cfg(*TINY_RESNET))
    compiled, losses = _train(compose_cfg(*TINY_RESNET, "trainer.compile=true"))
    assert type(compiled.task.trained).__name__ == "OptimizedModule"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-3, atol=1e-4)
