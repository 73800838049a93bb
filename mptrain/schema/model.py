"""The `model` group's schemas, one per architecture; `family` and `task` say which Task trains it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from mptrain.errors import UserError
from mptrain.families import TASKS
from mptrain.schema.rules import (
    HALF_OPEN_UNIT,
    OPEN_UNIT,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    Rule,
    check_fields,
    is_int,
    keyword_mapping,
    knob,
    one_of,
)

CUSTOM_TASKS = tuple(name for name, task in TASKS.items() if task.custom)  # what models/custom.py can train
RESNET_DEPTH = Rule(lambda v: is_int(v) and v >= 8 and (v - 2) % 6 == 0, "6n+2 with n >= 1 (20, 32, 44, 56, 110)")
CELLS = ("lstm", "gru")


@dataclass
class ModelConfig:
    name: str = knob(MISSING, "the architecture (docs/families.md)", example="resnet")
    family: str = knob("cnn", "cnn | rnn | gan | mlp | transformer: how reports group it")
    task: str = knob("classification", f"{' | '.join(TASKS)}: the Task that trains it (mptrain/families.py)",
                     one_of(*TASKS))
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


@dataclass
class SSDConfig(ModelConfig):
    """torchvision's SSD machinery on a narrow VGG-style trunk (mptrain/models/detection.py), no pretrained weights."""

    family: str = knob("detector", "how reports group it")
    task: str = knob("detection", "the Task that trains it", one_of("detection"))
    augment: bool = knob(False, "canvases are not augmented")
    width: int = knob(16, "channels of the trunk's first stage (x2, x4 after)", POSITIVE_INT)
    norm: str = knob("batch", "the trunk's normalisation: batch | none (VGG-16 as in the paper's SSD has none)",
                     one_of("batch", "none"))
    num_classes: Optional[int] = knob(None, "object classes (null: the dataset's; background is added)", POSITIVE_INT,
                                      example=10)
    min_ratio: float = knob(0.12, "the smallest default boxes' side, as a fraction of the canvas", OPEN_UNIT)
    max_ratio: float = knob(0.6, "the largest default boxes' side, as a fraction of the canvas", OPEN_UNIT)
    iou_thresh: float = knob(0.5, "a default box matches an object at this IoU or above", OPEN_UNIT)
    score_thresh: float = knob(0.01, "detections scored below this are dropped before NMS", HALF_OPEN_UNIT)
    nms_thresh: float = knob(0.45, "non-maximum suppression's IoU", OPEN_UNIT)
    detections_per_img: int = knob(100, "detections kept per canvas, best first", POSITIVE_INT)


NET = keyword_mapping("a mapping: _target_ (a class or factory function) and its keyword arguments")


@dataclass
class CustomModelConfig(ModelConfig):
    """Your own network: `model=custom model.net._target_=my_pkg.nets.MyNet` (mptrain/models/custom.py)."""

    family: str = knob("custom", "how reports group it")
    task: str = knob("classification", f"{' | '.join(CUSTOM_TASKS)}: the Task that trains it",
                     one_of(*CUSTOM_TASKS))
    augment: bool = knob(False, "let the dataset augment")
    net: Any = knob(None, "the network: _target_ (a class or factory) and its arguments; num_classes, "
                          "in_channels, image_size, vocab_size come from the dataset where the constructor names them",
                    NET)
    generator: Any = knob(None, "task=gan: noise (B, latent, 1, 1) -> images in [-1, 1]; _target_ and arguments",
                          NET)
    discriminator: Any = knob(None, "task=gan: images -> one logit each; _target_ and arguments", NET)
    latent: int = knob(100, "task=gan: noise dimensions (a generator parameter named latent gets it)", POSITIVE_INT)
    noise_seed: int = knob(0, "task=gan: fixed noise for image grids and FID samples", SEED)
    fid: FidConfig = field(default_factory=FidConfig)


REGISTRIES = ("torchvision", "timm", "hf_causal_lm")
NAMED = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a name in the library's registry")
KWARGS = keyword_mapping("a mapping of keyword arguments")


@dataclass
class RegistryModelConfig(ModelConfig):
    """A model by name from a library's registry (mptrain/models/registries.py): `registry` picks the library and
    the builder, `name` is the library's name for the network (and the run's model label)."""

    registry: str = knob("torchvision", "torchvision | timm | hf_causal_lm: the library whose registry builds it",
                         one_of(*REGISTRIES))
    kwargs: Any = knob(None, "more keyword arguments for the library's builder (get_model, create_model)", KWARGS)


@dataclass
class TorchvisionConfig(RegistryModelConfig):
    """Any torchvision classification model by name: `model=torchvision model.name=resnet18`."""

    name: str = knob("resnet18", "torchvision.models name (list_models()); no pretrained weights", NAMED,
                     example="resnet18")


@dataclass
class TimmConfig(RegistryModelConfig):
    """Any timm model by name: `model=timm model.name=resnet18` (the timm extra)."""

    registry: str = knob("timm", "the library whose registry builds it", one_of("timm"))
    name: str = knob("resnet18", "timm model name (timm.list_models()); no pretrained weights", NAMED,
                     example="convnext_atto")


@dataclass
class HFCausalLMConfig(RegistryModelConfig):
    """A Hugging Face causal LM from its config class, random weights: `model=hf_causal_lm model.config=gpt2`."""

    registry: str = knob("hf_causal_lm", "the library whose registry builds it", one_of("hf_causal_lm"))
    name: str = knob("${.config}", "the run's model label (the config's model type)")
    family: str = knob("transformer", "how reports group it")
    task: str = knob("language_model", "the Task that trains it", one_of("language_model"))
    augment: bool = knob(False, "let the dataset augment")
    config: str = knob("gpt2", "a transformers model type (CONFIG_MAPPING: gpt2, llama, gpt_neox, ...)", NAMED)
    overrides: Any = knob(None, "fields of that config class (n_layer, n_embd, ...); vocab_size is mptrain's",
                          KWARGS)


def schema_key(node) -> str:
    """What picks a model's schema and builder: a registry family's `registry`, else the family's `name`."""
    registry = node.get("registry")
    if registry is not None and registry not in REGISTRIES:
        raise UserError(f"model.registry must be one of {', '.join(REGISTRIES)} (got {registry!r}); "
                        "e.g. model.registry=timm")
    return registry or node.get("name")


SCHEMAS = {"resnet_schema": ResNetConfig, "resnet50_schema": ResNet50Config, "classic_cnn_schema": ClassicCnnConfig,
           "mlp_schema": MLPConfig, "lstm_classifier_schema": RecurrentConfig, "lstm_lm_schema": LanguageModelConfig,
           "dcgan_schema": DCGANConfig, "transformer_schema": TransformerConfig, "custom_schema": CustomModelConfig,
           "torchvision_schema": TorchvisionConfig, "timm_schema": TimmConfig,
           "hf_causal_lm_schema": HFCausalLMConfig, "ssd_schema": SSDConfig}  # + the families' (schema/__init__.py)
BY_NAME = {"resnet": ResNetConfig, "resnet50": ResNet50Config, "vgg": ClassicCnnConfig, "alexnet": ClassicCnnConfig,
           "mlp": MLPConfig, "lstm_classifier": RecurrentConfig, "lstm_lm": LanguageModelConfig,
           "dcgan": DCGANConfig, "transformer": TransformerConfig, "custom": CustomModelConfig,
           "torchvision": TorchvisionConfig, "timm": TimmConfig, "hf_causal_lm": HFCausalLMConfig, "ssd": SSDConfig}


def check(cfg) -> None:
    schema = BY_NAME.get(schema_key(cfg.model))
    if schema is None:
        raise UserError(f"unknown model.name={schema_key(cfg.model)!r}; choose one of {', '.join(BY_NAME)}")
    check_fields(cfg.model, schema, "model")
