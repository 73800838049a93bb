"""`model=custom`: any PyTorch network, built by Hydra's instantiate from `model.net._target_` (a class or a
factory function), trained by the task `model.task` names, like a built-in family.

What the data fixes reaches the constructor by name: a parameter called `num_classes`, `in_channels` or
`image_size` (images) or `vocab_size` (text) that `model.net` leaves unset gets the dataset's value. A classifier
maps (B, C, H, W) images to (B, num_classes) logits; a language model maps (B, T) token ids to (B, T, vocab_size)
logits (its state, if any, is its own: mptrain carries none between chunks). Both are checked once on a batch
of two before training, so a wrong shape is one line naming the target, not a traceback mid-step.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from mptrain.errors import UserError

SUPPLIED = {"num_classes": "num_classes", "in_channels": "in_channels", "image_size": "image_size",
            "vocab_size": "vocab_size"}


def build_custom(cfg, spec) -> nn.Module:
    from hydra.utils import get_object, instantiate
    from omegaconf import OmegaConf

    net = cfg.net
    target = net.get("_target_") if net is not None else None
    if not target:
        raise UserError("model=custom needs model.net._target_: the class or function that builds your network, "
                        "e.g. model.net._target_=my_pkg.nets.MyNet (its package on PYTHONPATH or installed)")
    try:
        builder = get_object(str(target))
    except Exception as e:  # ImportError, AttributeError, ValueError: Hydra words them differently
        raise UserError(f"model.net._target_={target} cannot be imported ({_first_line(e.__cause__ or e)}); check the "
                        "dotted path, "
                        "and put its package on PYTHONPATH or install it in the venv") from None
    given = set(OmegaConf.to_container(net))
    supplied = {name: getattr(spec, attr) for name, attr in SUPPLIED.items()
                if name not in given and _accepts(builder, name) and hasattr(spec, attr)}
    try:
        model = instantiate(net, **supplied)
    except Exception as e:
        cause = e.__cause__ or e
        raise UserError(f"model.net._target_={target} raised {type(cause).__name__} when built ({_first_line(cause)});"
                        f" check its arguments (model.net.<name>=..., +model.net.<name>=... for a new one)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.net._target_={target} returned {type(model).__name__}, not a torch.nn.Module")
    return check_output(model, target, cfg.task, spec)


def check_output(model: nn.Module, target: str, task: str, spec) -> nn.Module:
    """One FP32 forward on a batch of two; a wrong output shape for the task is one line."""
    language = task == "language_model"
    x = torch.zeros(2, 4, dtype=torch.long) if language else \
        torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)  # fmt: skip
    want = (2, 4, spec.vocab_size) if language else (2, spec.num_classes)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise UserError(f"model.net._target_={target} fails on a batch of shape {tuple(x.shape)} "
                        f"({type(e).__name__}: {_first_line(e)}); a {task} network takes "
                        f"{'(B, T) token ids' if language else '(B, C, H, W) images'}") from None
    finally:
        model.train(training)
    out = getattr(out, "logits", out)  # a Hugging Face output
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"model.net._target_={target} returns {shape} for a batch of shape {tuple(x.shape)}; a "
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def build_torchvision(cfg, spec) -> nn.Module:
    """`model=torchvision model.arch=<name>`: any torchvision classification model by name, no pretrained weights
    (nothing is downloaded), its class count the dataset's and its first convolution made for the dataset's
    channels (said once)."""
    import difflib
    import logging

    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if cfg.arch not in names:
        close = difflib.get_close_matches(str(cfg.arch), names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(f"model.arch={cfg.arch} is not a torchvision classification model; {hint}all: "
                        "python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'")
    model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=spec.num_classes)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != spec.in_channels:
        _replace(model, first, nn.Conv2d(spec.in_channels, first.out_channels, first.kernel_size, first.stride,
                                         first.padding, first.dilation, first.groups, first.bias is not None))
        logging.getLogger("mptrain").info("model.arch=%s: its first convolution takes %d channel(s) (the dataset's)"
                                          " instead of %d", cfg.arch, spec.in_channels, first.in_channels)
    return check_output(model, f"torchvision.models.{cfg.arch}", "classification", spec)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
