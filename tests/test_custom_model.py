"""Your own network through `model=custom`: a test-local package, trained like a built-in family."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf

from cli_helpers import mptrain, read_summary, user_package
from mptrain.data import DataSpec
from mptrain.data.text import TextSpec
from mptrain.errors import UserError
from mptrain.models import build_model

PACKAGE = '''
import torch.nn as nn


class Net(nn.Module):
    """A small CNN in a user's own package: BatchNorm by its own name, the class count from the dataset."""

    def __init__(self, in_channels, num_classes, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.body(x)


def tiny_lm(vocab_size, width=16):
    return nn.Sequential(nn.Embedding(vocab_size, width), nn.LayerNorm(width), nn.Linear(width, vocab_size))


def wrong_shape(num_classes):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 1))


def raises(num_classes):
    raise ValueError("no weights for you")


def generator(latent, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(latent, in_channels * image_size * image_size), nn.Tanh(),
                         nn.Unflatten(1, (in_channels, image_size, image_size)))


def discriminator(in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, 16), nn.LeakyReLU(0.2),
                         nn.Linear(16, 1))
'''
IMAGES = DataSpec("synthetic", in_channels=3, image_size=8, num_classes=4)


@pytest.fixture
def package(tmp_path, monkeypatch):
    with user_package(tmp_path, monkeypatch, "user_nets", PACKAGE):
        yield tmp_path


def _cfg(target, task="classification", **net):
    return OmegaConf.create({"name": "custom", "task": task, "net": {"_target_": target, **net}})


def test_the_dataset_reaches_the_constructor_by_name(package):
    model = build_model(_cfg("user_nets.Net", hidden=5), IMAGES)
    assert model(torch.zeros(3, 3, 8, 8)).shape == (3, 4) and model.body[0].out_channels == 5


def test_a_language_model_from_a_factory_function(package):
    model = build_model(_cfg("user_nets.tiny_lm", task="language_model"), TextSpec("synthetic_text", 11, "char"))
    logits, state = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 11) and state is None and model.initial_state(2, torch.device("cpu")) is None


@pytest.mark.parametrize("target, says", [
    ("user_nets.Missing", "model.net._target_=user_nets.Missing cannot be imported"),
    ("no_such_pkg.Net", "model.net._target_=no_such_pkg.Net cannot be imported"),
    ("user_nets.raises", "model.net._target_=user_nets.raises raised ValueError when built (no weights for you)"),
    ("user_nets.wrong_shape", "model.net._target_=user_nets.wrong_shape returns (2, 5) for a batch of shape "
                              "(2, 3, 8, 8); a classification network must return (2, 4)"),
])
def test_each_bad_network_is_one_line(package, target, says):
    with pytest.raises(UserError) as refused:
        build_model(_cfg(target), IMAGES)
    assert str(refused.value).startswith(says) and "\n" not in str(refused.value)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["fp32", "mixed", "bf16"])
def test_a_users_network_trains_like_a_built_in_family(package, tmp_path, mode):
    run = tmp_path / "run"
    out = mptrain("model=custom", "model.net._target_=user_nets.Net", "+model.net.hidden=6", f"precision={mode}",
                  "dataset=synthetic", "dataset.image_size=8", "dataset.train_size=64", "dataset.test_size=32",
                  "dataset.batch_size=16", "trainer.max_steps=3", "telemetry.numerics.every=3",
                  f"hydra.run.dir={run}", cwd=tmp_path, env={"PYTHONPATH": str(package)})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["model"] == "custom" and summary["family"] == "custom"
    assert summary["final"]["accuracy"] is not None and (run / "numerics.jsonl").is_file()
    if mode == "mixed":  # FP16 weights, BatchNorm kept FP32 by type whatever the user called it
        assert summary["final_loss_scale"] == 65536.0 and summary["bytes_per_parameter"]["model"]["masters"] > 0


def test_a_torchvision_model_by_name_takes_the_datasets_channels_and_classes():
    gray = DataSpec("fashion_mnist", in_channels=1, image_size=28, num_classes=10)
    model = build_model(OmegaConf.create({"registry": "torchvision", "name": "resnet18"}), gray)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10) and model.conv1.in_channels == 1
    with pytest.raises(UserError, match=r"^model.name=resnet19 is not a torchvision classification model; did you mean "
                                        r"resnet18"):
        build_model(OmegaConf.create({"registry": "torchvision", "name": "resnet19"}), gray)


@pytest.mark.e2e
def test_torchvision_resnet18_trains_under_mixed(tmp_path):
    run = tmp_path / "run"
    out = mptrain("model=torchvision", "model.name=resnet18", "precision=mixed", "dataset=synthetic",
                  "dataset.image_size=16", "dataset.channels=1", "dataset.train_size=32", "dataset.test_size=16",
                  "dataset.batch_size=8", "trainer.max_steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["model"] == "resnet18" and summary["family"] == "cnn"


def test_a_timm_model_by_name_and_its_close_matches(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import mptrain

    gray = DataSpec("fashion_mnist", in_channels=1, image_size=28, num_classes=10)
    assert build_model(OmegaConf.create({"registry": "timm", "name": "resnet18"}), gray)(
        torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(UserError, match=r"^model.name=resnet19 is not a timm model; did you mean resnet18"):
        build_model(OmegaConf.create({"registry": "timm", "name": "resnet19"}), gray)
    monkeypatch.chdir(tmp_path)
    summary = mptrain.train(["model=timm", "model.name=resnet18", "precision=mixed", "dataset=synthetic",
                             "dataset.image_size=16", "dataset.train_size=32", "dataset.test_size=16",
                             "dataset.batch_size=8", "trainer.max_steps=2", "trainer.progress=false"])
    assert summary["status"] == "completed" and summary["model"] == "resnet18"
    assert summary["bytes_per_parameter"]["model"]["masters"] > 0


def test_a_missing_extra_names_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "timm", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_timm)
    monkeypatch.setattr("importlib.import_module", lambda name: no_timm(name))
    with pytest.raises(UserError, match=r"^model=timm needs the timm package: pip install 'mptrain\[timm\]'"):
        build_model(OmegaConf.create({"registry": "timm", "name": "resnet18"}), IMAGES)


GPT2 = ["model=hf_causal_lm", "model.config=gpt2", "+model.overrides.n_layer=2", "+model.overrides.n_embd=32",
        "+model.overrides.n_head=2", "dataset=synthetic_text", "dataset.batch_size=4", "trainer.max_steps=2",
        "trainer.progress=false"]


@pytest.mark.parametrize("mode", ["mixed", "fp16_master", "bf16"])
def test_a_two_layer_gpt2_from_its_config_trains_in_every_kind_of_mode(mode, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import mptrain

    monkeypatch.chdir(tmp_path)
    summary = mptrain.train([*GPT2, f"precision={mode}"])
    assert summary["status"] == "completed" and summary["model"] == "gpt2" and summary["family"] == "transformer"
    assert summary["final"]["perplexity"] is not None


def test_a_causal_lm_config_checks_its_fields_and_keeps_its_own_norms_fp32():
    pytest.importorskip("transformers")
    from mptrain.precision.casting import cast_model

    text = TextSpec("synthetic_text", vocab_size=40, level="char")
    with pytest.raises(UserError, match=r"^model.overrides.n_layers is not a field of GPT2Config; did you mean n_layer"):
        build_model(OmegaConf.create({"registry": "hf_causal_lm", "config": "gpt2", "overrides": {"n_layers": 2}}),
                    text)
    with pytest.raises(UserError, match=r"^model.config=gtp2 is not a transformers model type; did you mean gpt2"):
        build_model(OmegaConf.create({"registry": "hf_causal_lm", "config": "gtp2"}), text)
    llama = build_model(OmegaConf.create({"registry": "hf_causal_lm", "config": "llama", "overrides": {
        "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
        "num_key_value_heads": 2}}), text)
    cast_model(llama, torch.float16, keep_norm_fp32=True)
    norms = [m for m in llama.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert llama.net.lm_head.weight.dtype == torch.float16
    logits, _ = llama(torch.zeros(2, 3, dtype=torch.long))
    assert logits.shape == (2, 3, 40) and logits.dtype == torch.float16


def test_gpt2s_conv1d_layers_become_the_same_linear_products():
    transformers = pytest.importorskip("transformers")
    from mptrain.models.registries import _conv1d_to_linear

    conv = transformers.pytorch_utils.Conv1D(6, 4)
    torch.nn.init.normal_(conv.weight)
    holder = torch.nn.Sequential(conv)
    x = torch.randn(3, 4)
    want = holder(x)
    assert _conv1d_to_linear(holder, transformers) == 1 and isinstance(holder[0], torch.nn.Linear)
    torch.testing.assert_close(holder(x), want)


def test_the_python_api_trains_a_users_network_and_returns_the_summary(package, tmp_path, monkeypatch):
    import mptrain

    monkeypatch.chdir(tmp_path)
    summary = mptrain.train(["model=custom", "model.net._target_=user_nets.Net", "precision=mixed",
                             "dataset=synthetic", "dataset.image_size=8", "dataset.train_size=32",
                             "dataset.test_size=16", "dataset.batch_size=16", "trainer.max_steps=2"])
    assert summary["status"] == "completed" and summary["model"] == "custom" and summary["precision"] == "mixed"
    run = next((tmp_path / "runs").glob("custom-synthetic-mixed/*"))
    assert (run / ".hydra" / "overrides.yaml").is_file() and (run / "summary.json").is_file()
    with pytest.raises(mptrain.UserError, match=r"^trainer.max_step is not a key of trainer"):
        mptrain.train(["model=mlp", "+trainer.max_step=3"])


def _write_images(root, classes=("cats", "dogs"), per_class=10, size=(20, 24)):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folder_splits_by_the_stated_rule_and_resizes(tmp_path):
    from mptrain.data import build_data

    _write_images(tmp_path / "imgs")
    cfg = {"name": "image_folder", "path": str(tmp_path / "imgs"), "image_size": 16, "batch_size": 4,
           "valid_fraction": 0.2}
    data = build_data(cfg, torch.device("cpu"), seed=0)
    assert data.spec.num_classes == 2 and data.spec.in_channels == 3 and data.spec.image_size == 16
    assert (data.train_size, data.test_size) == (16, 4)  # per class: 2 of 10 held out
    again = build_data(cfg, torch.device("cpu"), seed=5)  # the run seed does not move the split
    assert torch.equal(data.test.images, again.test.images)
    gray = build_data({**cfg, "channels": 1}, torch.device("cpu"), seed=0)
    assert gray.spec.in_channels == 1


@pytest.mark.parametrize("make, says", [
    (lambda root: None, "is not a folder"),
    (lambda root: root.mkdir(), "Couldn't find any class folder"),
    (lambda root: (_write_images(root), (root / "cats" / "bad.png").write_text("not an image")),
     "bad.png cannot be read as an image"),
    (lambda root: _write_images(root, classes=("only",)), "holds 1 class folder(s)"),
])
def test_image_folder_mistakes_are_one_line(tmp_path, make, says):
    from mptrain.data import build_data

    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(UserError) as refused:
        build_data({"name": "image_folder", "path": str(root), "image_size": 16}, torch.device("cpu"), seed=0)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_registry_model_built_for_one_input_size_says_how_to_fit_it():
    pytest.importorskip("timm")
    cifar = DataSpec("cifar10", in_channels=3, image_size=32, num_classes=10)
    with pytest.raises(UserError, match=r"^model.name=vit_tiny_patch16_224 \(timm\) fails on a batch of shape "
                                        r"\(2, 3, 32, 32\) .*\+model.kwargs.img_size=32"):
        build_model(OmegaConf.create({"registry": "timm", "name": "vit_tiny_patch16_224"}), cifar)
    vit = build_model(OmegaConf.create({"registry": "timm", "name": "vit_tiny_patch16_224",
                                        "kwargs": {"img_size": 32}}), cifar)
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


GAN = ["model=custom", "model.task=gan", "model.generator._target_=user_nets.generator",
       "model.discriminator._target_=user_nets.discriminator", "model.latent=8", "model.fid.enabled=false",
       "dataset=synthetic", "dataset.image_size=8", "dataset.channels=1", "dataset.train_size=32",
       "dataset.test_size=16", "dataset.batch_size=8", "trainer.max_steps=2", "trainer.progress=false"]


@pytest.mark.parametrize("mode", ["mixed", "bf16"])
def test_a_gan_of_your_own_trains_as_dcgan_does(package, tmp_path, monkeypatch, mode):
    import mptrain

    monkeypatch.chdir(tmp_path)
    summary = mptrain.train([*GAN, f"precision={mode}"])
    assert summary["status"] == "completed" and summary["model"] == "custom", summary.get("error")
    assert summary["steps"] == 2 and "d_real" in summary["final"]
    if mode == "mixed":  # one loss scaler per network, as DCGAN's
        assert set(summary["final_loss_scale"]) == {"g", "d"}


def test_a_gan_pair_of_the_wrong_shapes_is_one_line(package):
    from mptrain.data import DataSpec

    gray = DataSpec("synthetic", in_channels=1, image_size=8, num_classes=2)
    cfg = OmegaConf.create({"name": "custom", "task": "gan", "latent": 8,
                            "generator": {"_target_": "user_nets.generator", "image_size": 4},
                            "discriminator": {"_target_": "user_nets.discriminator"}})
    with pytest.raises(UserError, match=r"^model.generator._target_=user_nets.generator returns \(2, 1, 4, 4\) for "
                                        r"noise of shape \(2, 8, 1, 1\); a generator must return \(2, 1, 8, 8\)"):
        build_model(cfg, gray)
    cfg.generator.image_size = 8
    nets = build_model(cfg, gray)
    assert nets["g"].latent == 8 and nets["d"](torch.zeros(3, 1, 8, 8)).shape == (3,)
    cfg.discriminator = {"_target_": None}
    with pytest.raises(UserError, match=r"^model=custom needs model.discriminator._target_"):
        build_model(cfg, gray)


def test_a_registry_model_has_the_instruments_checkpoints_and_the_fp16_check(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import mptrain
    from mptrain.diagnose import cli as numerics_cli

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    summary = mptrain.train([*GPT2, "precision=fp16_master", "trainer.max_steps=4", "telemetry.numerics.every=2",
                             "trainer.checkpoint_every=2", f"hydra.run.dir={run}"])
    assert summary["status"] == "completed" and (run / "checkpoint.pt").is_file()
    layers = {line.split('"layer": "')[1].split('"')[0] for line in (run / "numerics.jsonl").read_text().splitlines()
              if '"layer": "' in line}
    assert any("transformer.h.1.mlp.c_fc" in layer for layer in layers)  # GPT-2's Conv1D, now a Linear, measured
    capsys.readouterr()
    numerics_cli.main(["--checkpoint", str(run), "--batches", "1"])
    assert "safe in FP16" in capsys.readouterr().out
