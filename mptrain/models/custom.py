"""`model=custom`: any PyTorch network, built by Hydra's instantiate from `model.net._target_` (a class or a
factory function), trained by the task `model.task` names, like a built-in family; a GAN is a pair,
`model.generator._target_` and `model.discriminator._target_`.

What the data fixes reaches the constructor by name: a parameter called `num_classes`, `in_channels` or
`image_size` (images), or `vocab_size` and a context length (`block_size`, `context_length`, `max_seq_len`, ...:
CONTEXT_NAMES, given dataset.bptt) (text) that `model.net` leaves unset gets the dataset's value. A classifier
maps (B, C, H, W) images to (B, num_classes) logits; a language model maps (B, T) token ids to (B, T, vocab_size)
logits (its state, if any, is its own: mptrain carries none between chunks). Both are checked once on a batch
of two at the run's real shape (a language model: T = dataset.bptt) before training, so a wrong shape or a
context too short is one line naming the target, not a traceback mid-step.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mptrain.errors import UserError, first_line

# the context-length spellings of nanoGPT/minGPT, Llama-style and GPT-2-style constructors
CONTEXT_NAMES = ("block_size", "context_length", "context_size", "max_seq_len", "max_seq_length", "seq_len", "n_ctx")
SUPPLIED = {"num_classes": "num_classes", "in_channels": "in_channels", "image_size": "image_size",
            "vocab_size": "vocab_size", **{name: "bptt" for name in CONTEXT_NAMES}}


def build_custom(cfg, spec) -> nn.Module:
    if cfg.task == "gan":
        return build_custom_gan(cfg, spec)
    model = instantiate_net(cfg.net, "model.net", spec)
    return check_output(model, f"model.net._target_={cfg.net._target_}", cfg.task, spec)


def instantiate_net(net, key: str, spec, supplied: dict | None = None) -> nn.Module:
    """Hydra's instantiate of `net` (a `_target_` and its arguments), the data's sizes passed where the constructor
    names them; every failure is one line naming `key`."""
    from hydra.utils import get_object, instantiate
    from omegaconf import OmegaConf

    target = net.get("_target_") if net is not None else None
    if not target:
        raise UserError(f"model=custom needs {key}._target_: the class or function that builds your network, "
                        f"e.g. {key}._target_=my_pkg.nets.MyNet (its package on PYTHONPATH or installed)")
    try:
        builder = get_object(str(target))
    except Exception as e:  # ImportError, AttributeError, ValueError: Hydra words them differently
        raise UserError(f"{key}._target_={target} cannot be imported ({first_line(e.__cause__ or e)}); check the "
                        "dotted path, and put its package on PYTHONPATH or install it in the venv") from None
    given = set(OmegaConf.to_container(net))
    values = {**{name: getattr(spec, attr) for name, attr in SUPPLIED.items() if hasattr(spec, attr)},
              **(supplied or {})}
    values = {name: v for name, v in values.items() if name not in given and _accepts(builder, name)}
    try:
        model = instantiate(net, **values)
    except Exception as e:
        cause = e.__cause__ or e
        raise UserError(f"{key}._target_={target} raised {type(cause).__name__} when built ({first_line(cause)}); "
                        f"check its arguments ({key}.<name>=..., +{key}.<name>=... for a new one)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}._target_={target} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_custom_gan(cfg, spec) -> nn.ModuleDict:
    """`model.task=gan`: a generator (B, latent, 1, 1) noise → (B, C, H, W) images in [-1, 1] (tanh), and a
    discriminator images → one logit each, as DCGAN's; a parameter named `latent` gets model.latent."""
    g = instantiate_net(cfg.generator, "model.generator", spec, {"latent": cfg.latent})
    d = instantiate_net(cfg.discriminator, "model.discriminator", spec)
    noise = torch.zeros(2, cfg.latent, 1, 1)
    images = _forward(g, noise, f"model.generator._target_={cfg.generator._target_}",
                      "it takes (B, model.latent, 1, 1) noise")
    want = (2, spec.in_channels, spec.image_size, spec.image_size)
    if not torch.is_tensor(images) or tuple(images.shape) != want:
        raise UserError(f"model.generator._target_={cfg.generator._target_} returns {_shape(images)} for noise of "
                        f"shape {tuple(noise.shape)}; a generator must return {want} (the dataset's images)")
    logits = _forward(d, images, f"model.discriminator._target_={cfg.discriminator._target_}",
                      "it takes (B, C, H, W) images")
    if not torch.is_tensor(logits) or logits.numel() != 2:
        raise UserError(f"model.discriminator._target_={cfg.discriminator._target_} returns {_shape(logits)} for "
                        f"images of shape {want}; a discriminator returns one logit per image (2,)")
    if getattr(g, "latent", cfg.latent) != cfg.latent:
        raise UserError(f"model.generator has latent={g.latent} but model.latent={cfg.latent}; make them agree")
    g.latent = cfg.latent  # the GAN task draws its noise by it
    return nn.ModuleDict({"g": g, "d": d if logits.dim() == 1 else FlatLogits(d)})


class FlatLogits(nn.Module):
    """A discriminator's (B, 1) or (B, 1, 1, 1) logits as the GAN task's (B,)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).flatten()


def _forward(model: nn.Module, x: torch.Tensor, label: str, takes: str):
    """One FP32 forward in eval mode without gradients (the mode restored after); a failure is one line naming
    `label` and ending with what the network `takes`."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    except Exception as e:
        raise UserError(f"{label} fails on a batch of shape {tuple(x.shape)} ({type(e).__name__}: {first_line(e)}); "
                        f"{takes}") from None
    finally:
        model.train(training)


def _shape(out) -> str:
    return str(tuple(out.shape)) if torch.is_tensor(out) else type(out).__name__


def check_output(model: nn.Module, label: str, task: str, spec, hint: str = "") -> nn.Module:
    """One FP32 forward on a batch of two; a wrong output shape for the task is one line naming `label`."""
    language = task == "language_model"
    tokens = getattr(spec, "bptt", 4)  # the run's chunk length: a context shorter than it fails here, not at step 1
    x = torch.zeros(2, tokens, dtype=torch.long) if language else \
        torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)  # fmt: skip
    want = (2, tokens, spec.vocab_size) if language else (2, spec.num_classes)
    takes = (f"(B, T) token ids with T = dataset.bptt={tokens}: give it a context of at least {tokens} "
             f"(a constructor parameter named {', '.join(CONTEXT_NAMES[:3])}... receives dataset.bptt) or use a "
             "smaller dataset.bptt") if language else "(B, C, H, W) images"  # fmt: skip
    out = _forward(model, x, label, f"a {task} network takes {takes}{hint}")
    out = getattr(out, "logits", out)  # a Hugging Face output
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        raise UserError(f"{label} returns {_shape(out)} for a batch of shape {tuple(x.shape)}; a "
                        f"{task} network must return {want} (num_classes/vocab_size from the dataset: name a "
                        "constructor parameter num_classes or vocab_size to receive it)")
    return StatelessLanguageModel(model) if language else model


class StatelessLanguageModel(nn.Module):
    """A (B, T) → (B, T, V) network in the language-model task's interface: (logits, state), no carried state."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def initial_state(self, batch_size: int, device: torch.device):
        return None

    def forward(self, tokens: torch.Tensor, state=None):
        out = self.net(tokens)
        out = getattr(out, "logits", out)
        return (out[0] if isinstance(out, (tuple, list)) else out), None


def _accepts(builder, name: str) -> bool:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False
    return name in params


