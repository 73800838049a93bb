"""The `model` group's schemas, one per architecture; `family` and `task` say which Task trains it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from mptrain.errors import UserError
from mptrain.schema.rules import HALF_OPEN_UNIT, POSITIVE, POSITIVE_INT, SEED, Rule, check_fields, is_int, knob, one_of

RESNET_DEPTH = Rule(lambda v: is_int(v) and v >= 8 and (v - 2) % 6 == 0, "6n+2 with n >= 1 (20, 32, 44, 56, 110)")
CELLS = ("lstm", "gru")


@dataclass
class ModelConfig:
    name: str = knob(MISSING, "the architecture (docs/families.md)", example="resnet")
    family: str = knob("cnn", "cnn | rnn | gan | mlp | transformer: how reports group it")
    task: str = knob("classification", "classification | language_model | gan: the Task that trains it",
                     one_of("classification", "language_model", "gan"))
    augment: bool = knob(True, "let the dataset augment (false: the images as they are)")


@dataclass
class ResNetConfig(ModelConfig):
    depth: int = knob(20, "CIFAR-style ResNet depth", RESNET_DEPTH)
    width: int = knob(16, "channels of the first stage (x2 per stage)", POSITIVE_INT)


@dataclass
class ResNet50Config(ModelConfig):
    small_input: Any = knob("auto", "a 3x3 stem without max-pool: auto (images under 64 px) | true | false",
                            one_of("auto", True, False))


@dataclass
class ClassicCnnConfig(ModelConfig):  # VGG-16-BN and AlexNet, small-image variants
    width_mult: float = knob(1.0, "channels x this", POSITIVE)
    dropout: float = knob(0.5, "dropout before the classifier's layers", HALF_OPEN_UNIT)


@dataclass
class MLPConfig(ModelConfig):
    family: str = knob("mlp", "how reports group it")
    augment: bool = knob(False, "let the dataset augment")
    depth: int = knob(14, "Linear layers (at 14 about 6 % of weight gradients flush to zero in FP16)", POSITIVE_INT)
    width: int = knob(256, "hidden units per layer", POSITIVE_INT)


@dataclass
class RecurrentConfig(ModelConfig):
    family: str = knob("rnn", "how reports group it")
    cell: str = knob("lstm", "lstm | gru", one_of(*CELLS))
    layers: int = knob(1, "stacked recurrent layers", POSITIVE_INT)
    width: int = knob(128, "hidden units per layer (small for the CPU; 512+ on a GPU)", POSITIVE_INT)
    dropout: float = knob(0.0, "dropout between layers (and on the LM's embeddings and outputs)", HALF_OPEN_UNIT)


@dataclass
class LanguageModelConfig(RecurrentConfig):
    task: str = knob("language_model", "the Task that trains it", one_of("language_model"))
    layers: int = knob(2, "stacked recurrent layers", POSITIVE_INT)
    dropout: float = knob(0.1, "dropout on embeddings, between layers and on outputs", HALF_OPEN_UNIT)
    embed: Optional[int] = knob(None, "embedding size (null: width)", POSITIVE_INT, example=256)
    tie_weights: bool = knob(True, "share the embedding with the softmax (a projection if embed != width)")


@dataclass
class TransformerConfig(ModelConfig):
    family: str = knob("transformer", "how reports group it")
    task: str = knob("language_model", "the Task that trains it", one_of("language_model"))
    layers: int = knob(2, "decoder blocks", POSITIVE_INT)
    heads: int = knob(4, "attention heads (model.width must be a multiple)", POSITIVE_INT)
    width: int = knob(128, "the residual stream's width (the MLP is 4x)", POSITIVE_INT)
    context: int = knob(64, "positions the model has embeddings for: at least dataset.bptt", POSITIVE_INT)
    dropout: float = knob(0.0, "dropout on embeddings, attention and residual branches (0: attention runs fused)",
                          HALF_OPEN_UNIT)
    tie_weights: bool = knob(True, "share the token embedding with the output head")


@dataclass
class FidConfig:
    enabled: bool = knob(True, "Frechet distance in the features of a small FP32 classifier (not Inception)")
    samples: int = knob(2048, "held-out images (and as many generated ones)", POSITIVE_INT)
    extractor_steps: int = knob(2000, "FP32 training steps of the feature extractor (trained once, cached)",
                                POSITIVE_INT)
    cache_dir: str = knob("${oc.env:MPTRAIN_CACHE,'~/.cache/mptrain'}/fid", "where the trained extractor is cached "
                                                                          "(MPTRAIN_CACHE moves it)")


@dataclass
class DCGANConfig(ModelConfig):
    family: str = knob("gan", "how reports group it")
    task: str = knob("gan", "the Task that trains it", one_of("gan"))
    augment: bool = knob(False, "the GAN must learn the real images, not crops and flips of them")
    width: int = knob(32, "feature maps next to the image (ngf = ndf), x2 per layer inwards", POSITIVE_INT)
    latent: int = knob(100, "noise dimensions", POSITIVE_INT)
    noise_seed: int = knob(0, "fixed noise for image grids and FID samples", SEED)
    fid: FidConfig = field(default_factory=FidConfig)


NET = Rule(lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)),
           "a mapping: _target_ (a class or factory function) and its keyword arguments")


@dataclass
class CustomModelConfig(ModelConfig):
    """Your own network: `model=custom model.net._target_=my_pkg.nets.MyNet` (mptrain/models/custom.py)."""

    family: str = knob("custom", "how reports group it")
    task: str = knob("classification", "classification | language_model: the Task that trains it",
                     one_of("classification", "language_model"))
    augment: bool = knob(False, "let the dataset augment")
    net: Any = knob(None, "the network: _target_ (a class or factory) and its arguments; num_classes, "
                          "in_channels, image_size, vocab_size come from the dataset where the constructor names them",
                    NET)


ARCH = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a torchvision model name")


@dataclass
class TorchvisionConfig(ModelConfig):
    """Any torchvision classification model by name: `model=torchvision model.arch=resnet18`."""

    family: str = knob("cnn", "how reports group it")
    arch: str = knob("resnet18", "torchvision.models name (list_models()); no pretrained weights", ARCH,
                     example="resnet18")


SCHEMAS = {"resnet_schema": ResNetConfig, "resnet50_schema": ResNet50Config, "classic_cnn_schema": ClassicCnnConfig,
           "mlp_schema": MLPConfig, "lstm_classifier_schema": RecurrentConfig, "lstm_lm_schema": LanguageModelConfig,
           "dcgan_schema": DCGANConfig, "transformer_schema": TransformerConfig, "custom_schema": CustomModelConfig,
           "torchvision_schema": TorchvisionConfig}
BY_NAME = {"resnet": ResNetConfig, "resnet50": ResNet50Config, "vgg": ClassicCnnConfig, "alexnet": ClassicCnnConfig,
           "mlp": MLPConfig, "lstm_classifier": RecurrentConfig, "lstm_lm": LanguageModelConfig,
           "dcgan": DCGANConfig, "transformer": TransformerConfig, "custom": CustomModelConfig,
           "torchvision": TorchvisionConfig}


def check(cfg) -> None:
    schema = BY_NAME.get(cfg.model.name)
    if schema is None:
        raise UserError(f"unknown model.name={cfg.model.name!r}; choose one of {', '.join(BY_NAME)}")
    check_fields(cfg.model, schema, "model")
