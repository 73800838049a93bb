"""Model registry: ``build_model(model_cfg, spec)`` picks a builder by ``model.registry`` or ``model.name``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mptrain import families
from mptrain.errors import UserError
from mptrain.models.cnn import build_alexnet, build_resnet, build_resnet50, build_vgg
from mptrain.models.custom import build_custom
from mptrain.models.gan import build_dcgan
from mptrain.models.mlp import build_mlp
from mptrain.models.registries import build_hf_causal_lm, build_timm, build_torchvision
from mptrain.models.rnn import build_lstm_classifier, build_lstm_lm
from mptrain.models.transformer import build_transformer
from mptrain.schema import typed
from mptrain.schema.model import schema_key


def build_ssd(cfg, spec) -> nn.Module:
    """models/detection.py, imported when a detector is built: its torchvision import brings torch._dynamo,
    1.5 s of every process that trains anything else."""
    from mptrain.models.detection import build_ssd as build

    return build(cfg, spec)

# A builder takes (model config, data spec) and returns the module(s) its task trains:
# classifiers give (B, num_classes) logits, the LM (B, T, vocab) logits and a state,
# the GAN a ModuleDict of generator "g" and discriminator "d".
MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet": build_resnet,
    "resnet50": build_resnet50,
    "vgg": build_vgg,
    "alexnet": build_alexnet,
    "mlp": build_mlp,
    "lstm_classifier": build_lstm_classifier,
    "lstm_lm": build_lstm_lm,
    "dcgan": build_dcgan,
    "transformer": build_transformer,
    "ssd": build_ssd,  # a detector: trunk + heads in the mode's precision, loss and decoding in FP32
    "custom": build_custom,  # any network: model.net._target_ (models/custom.py)
    # by name from a library's registry, picked by model.registry (model.name is then the library's name for it)
    "torchvision": build_torchvision,
    "timm": build_timm,
    "hf_causal_lm": build_hf_causal_lm,
}



def _family_builder(path: str) -> Callable[..., nn.Module]:
    """A family's model builder (mptrain/families.py), imported when a model of it is built."""
    return lambda cfg, spec: families.load(path)(cfg, spec)


MODELS.update({name: _family_builder(o.builder) for o in families.options("model") for name in o.names})


def build_model(model_cfg, spec) -> nn.Module:
    """Build the model named by ``model_cfg.name`` for data described by ``spec``; keys the config leaves out
    take their schema's defaults (mptrain/schema/model.py), and each value is checked against its rule."""
    model_cfg = typed("model", model_cfg)
    key = schema_key(model_cfg)
    if key not in MODELS:
        raise UserError(f"unknown model.name={key!r}; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[key](model_cfg, spec)


__all__ = ["MODELS", "build_model"]
