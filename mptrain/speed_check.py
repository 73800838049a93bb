"""The speed options check themselves: before the first step, one batch's gradients through the optimised
training forward (`trainer.channels_last`, `trainer.compile`) are compared with the plain contiguous eager path.

Why: a kernel the options select can be wrong on some machines. With torch 2.14.1 on AVX2-only CPUs a 1x1
stride-2 convolution with few channels in channels_last returns a weight gradient 59 % off (torch's FP64
answer; `../shared/repro/channels_last_conv_grad.py`), and torch.compile's layout optimisation lands on the
same kernel: the run would train on wrong gradients without a sign.

How "beyond rounding" is told: each parameter's gradient through the optimised path is compared with the plain
path's in the run's own precision. Where they differ by more than `AGREE` (relative, 1e-3) an FP64 copy of the
networks gives the exact answer, and a gradient is wrong when its error against FP64 is more than `FACTOR` times
the plain path's own error and above `AGREE`: in FP16 the plain path carries rounding of its own, in FP32 almost
none. A wrong gradient refuses the run with one line naming the layer (refusing, not falling back: the user
asked for the option, and a sweep should not silently mix layouts). The check runs twice through the optimised
path (the faulty kernel above is right on its first call in a process and wrong after), on one batch of at most
`CHECK_SAMPLES` samples (the whole first batch under compile, which must compile its shape anyway), on copies of
the state: the run starts from exactly where it would have.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn

from mptrain.errors import UserError
from mptrain.precision.casting import fp64_copy

log = logging.getLogger(__name__)
AGREE = 1e-3  # relative gradient difference the paths may show without a closer look
FACTOR = 10.0  # how much further from FP64 than the plain path a gradient may be before it is wrong
CHECK_SAMPLES = 32
FAST_PASSES = 2  # the optimised path runs twice: a kernel can be right once and wrong the next time


class _Exact:
    """The FP64 reference's precision: no autocast, no emulated kernels."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def speed_options(trainer_cfg) -> list[str]:
    return [f"trainer.{flag}=true" for flag in ("channels_last", "compile") if trainer_cfg[flag]]


def verify_speed_options(task, batch, precision, options: list[str], replicas=None) -> dict:
    """Refuse (UserError) when the optimised path's gradients are wrong; else what was compared, for summary.json.
    Data-parallel ranks decide together (one refusing rank refuses all: none is left waiting in an all-reduce)."""
    try:
        result, refusal = _compare(task, batch, precision, options), None
    except UserError as e:
        result, refusal = None, str(e)
    if replicas is not None and replicas.any(refusal is not None, precision.device) and refusal is None:
        refusal = f"{' '.join(options)}: another data-parallel rank found wrong gradients (its log names the layer)"
    if refusal:
        raise UserError(refusal)
    return result


def _compare(task, batch, precision, options: list[str]) -> dict:
    nets = task.networks()
    if not any(o.startswith("trainer.compile") for o in options):
        batch = tuple(t[:CHECK_SAMPLES] if torch.is_tensor(t) else t for t in batch)
    pristine = {name: copy.deepcopy(net.state_dict()) for name, net in nets.items()}
    plain = {name: copy.deepcopy(net).to(memory_format=torch.contiguous_format) for name, net in nets.items()}
    fast_runs = []
    try:
        for _ in range(FAST_PASSES):
            with _local_gradients(task):
                fast_runs.append(_gradients(lambda: task.check_loss(batch, precision), nets, precision))
            for name, net in nets.items():  # BatchNorm statistics moved: every pass starts from the same state
                net.load_state_dict(pristine[name])
    finally:
        for name, net in nets.items():  # and so does the run
            net.load_state_dict(pristine[name])
            net.zero_grad(set_to_none=True)
    contiguous = tuple(t.contiguous() if torch.is_tensor(t) else t for t in batch)
    slow = _gradients(lambda: task.check_loss(contiguous, precision, plain), plain, precision)
    # per parameter, the pass furthest from the plain path: the faulty kernel seen so far is right on its first
    # call in a process and wrong after (state left behind), so one pass can miss it
    fast = {k: max((run[k] for run in fast_runs if k in run), key=lambda g: relative_error(g, slow[k]))
            for k in slow if any(k in run for run in fast_runs)}
    worst = max(((relative_error(fast[k], slow[k]), k) for k in fast), default=(0.0, None))
    result = {"options": options, "samples": _samples(batch), "max_rel_diff_vs_plain": worst[0]}
    if worst[0] <= AGREE:
        log.info("%s: gradients agree with the plain path (max relative difference %.1e)", " ".join(options), worst[0])
        return result
    exact_nets = {name: fp64_copy(net) for name, net in plain.items()}
    exact_batch = tuple(t.double() if torch.is_tensor(t) and t.is_floating_point() else t for t in contiguous)
    exact = _gradients(lambda: task.check_loss(exact_batch, _Exact(), exact_nets), exact_nets, None)
    for name in slow:  # in parameter order: the first wrong one is the layer nearest the input of its network
        if name not in fast or not torch.isfinite(exact[name]).all() or exact[name].norm() == 0:
            continue
        fast_err, plain_err = relative_error(fast[name], exact[name]), relative_error(slow[name], exact[name])
        if fast_err > max(AGREE, FACTOR * plain_err):
            raise UserError(_refusal(options, name, nets, fast_err, plain_err))
    log.info("%s: gradients within rounding of an FP64 reference (max relative difference to the plain path %.1e)",
             " ".join(options), worst[0])
    return {**result, "fp64_checked": True}


def _gradients(loss_fn, nets: dict[str, nn.Module], precision) -> dict[str, torch.Tensor]:
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    devices = [d.index or 0 for d in {p.device for n in nets.values() for p in n.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):  # dropout and noise draw the same values in every pass
        torch.manual_seed(0)
        with precision.kernels() if precision is not None else contextlib.nullcontext():
            loss_fn().backward()
    grads = {}
    for net_name, net in nets.items():
        for name, p in net.named_parameters():
            if p.grad is not None:
                grads[f"{net_name}.{name}"] = p.grad.detach().double()
    for net in nets.values():
        net.zero_grad(set_to_none=True)
    return grads


@contextlib.contextmanager
def _local_gradients(task):
    """Under DDP the check compares this rank's own gradients: no all-reduce for the probe's backward."""
    trained = getattr(task, "trained", None)
    ddp = getattr(trained, "_orig_mod", trained)
    with ddp.no_sync() if isinstance(ddp, nn.parallel.DistributedDataParallel) else contextlib.nullcontext():
        yield


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; 0 where both are non-finite in the same places, inf where they differ."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return 0.0 if torch.equal(a.isfinite(), b.isfinite()) else float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _samples(batch) -> int:
    return int(batch[0].shape[0]) if batch and torch.is_tensor(batch[0]) else 0


def _refusal(options, name: str, nets, fast_err: float, plain_err: float) -> str:
    net_name, param = name.split(".", 1)
    module_name, _, kind = param.rpartition(".")
    module = nets[net_name].get_submodule(module_name) if module_name else nets[net_name]
    where = f"{module_name or net_name} ({type(module).__name__}({module.extra_repr()}))"
    return (f"{' '.join(options)} computes wrong gradients on this machine: layer {where} gets a {kind} gradient "
            f"{fast_err:.1%} off an FP64 reference (the plain contiguous eager path: {plain_err:.1e}), a fault of "
            f"the kernel these options select (torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}); run without {' and '.join(o.split('=')[0] for o in options)}")
