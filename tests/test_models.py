"""Model registry: shapes on small images, structure, and config validation."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mptrain.data import DataSpec
from mptrain.errors import UserError
from mptrain.models import MODELS, build_model

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# Narrow variants keep the whole file fast on a 2-core CPU.
TINY = {
    "resnet": {"name": "resnet", "depth": 8, "width": 4},
    "vgg": {"name": "vgg", "width_mult": 0.0625},
    "alexnet": {"name": "alexnet", "width_mult": 0.0625},
    "mlp": {"name": "mlp", "depth": 4, "width": 8},
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_small_models_give_logits_and_gradients(name, channels, size):
    torch.manual_seed(0)
    spec = DataSpec(name="t", in_channels=channels, image_size=size, num_classes=7)
    model = build_model(OmegaConf.create(TINY[name]), spec)
    logits = model(torch.randn(3, channels, size, size))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_resnet50_small_input_forward():
    spec = DataSpec(name="t", in_channels=3, image_size=32, num_classes=10)
    model = build_model(OmegaConf.create({"name": "resnet50", "small_input": "auto"}), spec)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet50_large_input_keeps_imagenet_stem_with_new_channels():
    spec = DataSpec(name="t", in_channels=1, image_size=224, num_classes=5)
    model = build_model(OmegaConf.create({"name": "resnet50"}), spec)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.fc.out_features == 5
    forced = build_model(OmegaConf.create({"name": "resnet50", "small_input": True}), spec)
    assert isinstance(forced.maxpool, nn.Identity)


def test_resnet20_has_the_published_parameter_count():
    spec = DataSpec(name="t", in_channels=3, image_size=32, num_classes=10)
    model = build_model(OmegaConf.create({"name": "resnet", "depth": 20, "width": 16}), spec)
    count = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < count < 0.28e6  # He et al. report 0.27M
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) == 19


@pytest.mark.parametrize("depth", [21, 2, "twenty"])
def test_resnet_depth_must_be_6n_plus_2(depth):
    spec = DataSpec(name="t", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(UserError, match=r"6n\+2.*model\.depth=20"):
        build_model(OmegaConf.create({"name": "resnet", "depth": depth}), spec)


def test_vgg16_and_alexnet_structure():
    spec = DataSpec(name="t", in_channels=1, image_size=28, num_classes=10)
    vgg = build_model(OmegaConf.create(TINY["vgg"]), spec)
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg.modules()) == 13
    alexnet = build_model(OmegaConf.create(TINY["alexnet"]), spec)
    assert sum(isinstance(m, nn.Conv2d) for m in alexnet.modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in alexnet.modules()) == 3
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in alexnet.modules())


def test_bad_model_config_is_a_user_error():
    spec = DataSpec(name="t", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(UserError, match="unknown model.name"):
        build_model(OmegaConf.create({"name": "transformer9000"}), spec)
    with pytest.raises(UserError, match="width_mult"):
        build_model(OmegaConf.create({"name": "vgg", "width_mult": 0}), spec)
    with pytest.raises(UserError, match="small_input"):
        build_model(OmegaConf.create({"name": "resnet50", "small_input": "sometimes"}), spec)


def test_model_yamls_name_registered_models_and_tasks(compose_cfg):
    from mptrain.schema.model import schema_key
    from mptrain.tasks import TASKS

    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= set(MODELS)
    for path in files:
        cfg = compose_cfg(f"model={path.stem}").model
        assert schema_key(cfg) == path.stem and schema_key(cfg) in MODELS  # a registry family: its registry
        assert cfg.family in ("cnn", "rnn", "gan", "mlp", "transformer", "detector", "custom") and cfg.task in TASKS


def test_mlp_is_plain_and_its_gradients_shrink_with_depth():
    """No normalisation, default init: the first layer's gradient shrinks as layers are added."""
    spec = DataSpec(name="t", in_channels=1, image_size=28, num_classes=10)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    first_grad = {}
    for depth in (3, 12):
        torch.manual_seed(0)
        model = build_model(OmegaConf.create({"name": "mlp", "depth": depth, "width": 64}), spec)
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in model.modules())
        nn.functional.cross_entropy(model(x), y).backward()
        first_grad[depth] = model[1].weight.grad.abs().mean().item()
    assert first_grad[12] < first_grad[3] / 100
