"""Models by name from a library's registry: `model=torchvision|timm|hf_causal_lm model.name=...`.

Each builds with no pretrained weights (nothing is downloaded), fits the network to the dataset (its classes, its
channels, mptrain's vocabulary) and says once what it changed; an unknown name lists close matches and a missing
library names the extra that installs it. The built network is checked on a batch of two like `model=custom`'s.
"""

from __future__ import annotations

import difflib
import logging

import torch
from torch import nn

from mptrain.errors import UserError, first_line
from mptrain.models.custom import check_output

log = logging.getLogger("mptrain")


def _import(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"model={extra} needs the {module} package: pip install 'mptrain[{extra}]' "
                        f"(or pip install {module})") from None


def _keywords(node) -> dict:
    """A config mapping (model.kwargs, model.overrides) as plain keyword arguments; null: none."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node) if node else {}


def _unknown(key: str, value: str, names, what: str, listing: str) -> UserError:
    close = difflib.get_close_matches(str(value), list(names), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UserError(f"{key}={value} is not {what}; {hint}all: {listing}")


def build_torchvision(cfg, spec) -> nn.Module:
    """`model=torchvision model.name=<name>`: any torchvision classification model, its class count the
    dataset's and its first convolution made for the dataset's channels."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.name not in names:
        raise _unknown("model.name", cfg.name, names, "a torchvision classification model",
                       "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'")
    try:
        model = torchvision.models.get_model(cfg.name, weights=None, num_classes=spec.num_classes,
                                             **_keywords(cfg.kwargs))
    except Exception as e:
        raise UserError(f"torchvision.models.get_model({cfg.name!r}) raised {type(e).__name__} ({first_line(e)}); "
                        "check model.kwargs") from None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != spec.in_channels:
        _replace(model, first, nn.Conv2d(spec.in_channels, first.out_channels, first.kernel_size, first.stride,
                                         first.padding, first.dilation, first.groups, first.bias is not None))
        log.info("model.name=%s: its first convolution takes %d channel(s) (the dataset's) instead of %d",
                 cfg.name, spec.in_channels, first.in_channels)
    return check_output(model, f"model.name={cfg.name} (torchvision)", "classification", spec,
                        hint=f"; built for one input size? +model.kwargs.image_size={spec.image_size}")


def build_timm(cfg, spec) -> nn.Module:
    """`model=timm model.name=<name>`: `timm.create_model(pretrained=False)` with the dataset's classes and
    channels (timm adapts the stem itself); model.kwargs reach create_model."""
    timm = _import("timm", "timm")

    if not timm.is_model(cfg.name):
        raise _unknown("model.name", cfg.name, timm.list_models(), "a timm model",
                       "python -c 'import timm; print(timm.list_models())'")
    try:
        model = timm.create_model(cfg.name, pretrained=False, num_classes=spec.num_classes,
                                  in_chans=spec.in_channels, **_keywords(cfg.kwargs))
    except Exception as e:
        raise UserError(f"timm.create_model({cfg.name!r}) raised {type(e).__name__} ({first_line(e)}); "
                        "check model.kwargs and the dataset's image size (dataset.image_size)") from None
    return check_output(model, f"model.name={cfg.name} (timm)", "classification", spec,
                        hint=f"; built for one input size? +model.kwargs.img_size={spec.image_size}, or a larger "
                             "dataset.image_size")


def build_hf_causal_lm(cfg, spec) -> nn.Module:
    """`model=hf_causal_lm model.config=gpt2 +model.overrides.n_layer=2`: a Hugging Face causal LM built from its
    config class (`AutoModelForCausalLM.from_config`, random weights, no download) over mptrain's vocabulary."""
    transformers = _import("transformers", "hf")

    configs = transformers.CONFIG_MAPPING
    if cfg.config not in configs:
        raise _unknown("model.config", cfg.config, list(configs.keys()), "a transformers model type",
                       "python -c 'import transformers; print(list(transformers.CONFIG_MAPPING))'")
    config_class = configs[cfg.config]
    defaults = config_class()
    overrides = _keywords(cfg.overrides)
    for key in overrides:  # a config class keeps any keyword silently: a misspelt size would be lost
        if not hasattr(defaults, key):
            close = difflib.get_close_matches(key, [k for k in defaults.to_dict() if not k.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"model.overrides.{key} is not a field of {config_class.__name__}{hint} (its fields: "
                            f"python -c 'import transformers; print(transformers.{config_class.__name__}())')")
    special = {k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id")  # ids beyond mptrain's vocabulary
               if k not in overrides and isinstance(getattr(defaults, k, None), int)
               and getattr(defaults, k) >= spec.vocab_size}
    try:
        config = config_class(**{**overrides, **special, "vocab_size": spec.vocab_size})
        model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise UserError(f"AutoModelForCausalLM.from_config({config_class.__name__}) raised {type(e).__name__} "
                        f"({first_line(e)}); check model.overrides") from None
    converted = _conv1d_to_linear(model, transformers)
    if converted:
        log.info("model.config=%s: %d transformers Conv1D layers became nn.Linear (the same product, "
                 "transposed weight) so FP8 and the numerics instruments see them", cfg.config, converted)
    log.info("model.config=%s: %.1fM parameters, vocabulary %d (mptrain's)", cfg.config,
             sum(p.numel() for p in model.parameters()) / 1e6, spec.vocab_size)
    return check_output(model, f"model.config={cfg.config} (transformers {config_class.__name__})", "language_model", spec)


def _conv1d_to_linear(model: nn.Module, transformers) -> int:
    """GPT-2's Conv1D is a Linear with its weight stored transposed; torchao's FP8 conversion and mptrain's
    Linear-keyed instruments only know nn.Linear."""
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None)
    if conv1d is None:
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, conv1d):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1], bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                count += 1
    return count


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
