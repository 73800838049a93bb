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
        raise UserError(f"model.net._target_={target} cannot be imported ({first_line(e.__cause__ or e)}); check the "
                        "dotted path, "
                        "and put its package on PYTHONPATH or install it in the venv") from None
    given = set(OmegaConf.to_container(net))
    supplied = {name: getattr(spec, attr) for name, attr in SUPPLIED.items()
                if name not in given and _accepts(builder, name) and hasattr(spec, attr)}
    try:
        model = instantiate(net, **supplied)
    except Exception as e:
        cause = e.__cause__ or e
        raise UserError(f"model.net._target_={target} raised {type(cause).__name__} when built ({first_line(cause)});"
                        f" check its arguments (model.net.<name>=..., +model.net.<name>=... for a new one)") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model.net._target_={target} returned {type(model).__name__}, not a torch.nn.Module")
    return check_output(model, f"model.net._target_={target}", cfg.task, spec)


def check_output(model: nn.Module, label: str, task: str, spec, hint: str = "") -> nn.Module:
    """One FP32 forward on a batch of two; a wrong output shape for the task is one line naming `label`."""
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
        raise UserError(f"{label} fails on a batch of shape {tuple(x.shape)} "
                        f"({type(e).__name__}: {first_line(e)}); a {task} network takes "
                        f"{'(B, T) token ids' if language else '(B, C, H, W) images'}{hint}") from None
    finally:
        model.train(training)
    out = getattr(out, "logits", out)  # a Hugging Face output
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not torch.is_tensor(out) or tuple(out.shape) != want:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"{label} returns {shape} for a batch of shape {tuple(x.shape)}; a "
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


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
