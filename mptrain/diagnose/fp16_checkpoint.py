"""Is a trained model safe to run in FP16? `mptrain-numerics --checkpoint <run dir>`.

The run (trained in any mode: fp32, bf16, ...) is rebuilt from its own overrides with FP16 weights (`mixed`;
emulated FP16 kernels on a CPU), its checkpoint's weights are rounded into it, and K held-out batches run
forward with every leaf module's output measured against FP16's 65504. Then, greedily, the first module whose
output overflows is kept in FP32 (its weights and input in FP32, its output left in FP32 so that what follows
sees the large values exactly; FP16 modules downstream get their input cast back to FP16) and the batches run
again, until no output overflows: the set of modules to keep in FP32 for FP16 inference or fine-tuning, as
transformers' `_keep_in_fp32_modules` keeps T5's `wo`. Nothing is written except `--json`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from torch import nn

from mptrain.errors import UserError
from mptrain.precision.casting import CastInputs
from mptrain.telemetry import headroom


def compose_from_run(run_dir: Path, overrides: list[str]):
    """The run's config, recomposed from its own overrides with FP16 weights and `overrides` on top."""
    from omegaconf import OmegaConf

    from mptrain.console import compose

    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not recorded.is_file():
        raise UserError(f"{run_dir} is not a run dir with a checkpoint (checkpoint.pt and .hydra/overrides.yaml); "
                        "train with trainer.checkpoint_every=N, then point --checkpoint at that run's folder")
    kept = [o for o in OmegaConf.load(recorded) if not o.lstrip("+~").startswith(("precision", "hydra", "trainer.resume"))]
    return compose([*kept, *overrides, "precision=mixed", "trainer.progress=false"])


def load_fp16_model(cfg, run_dir: Path, device: torch.device):
    """(task, precision, held-out loader, the checkpoint's weights): the run's networks in FP16, holding its
    checkpoint's weights rounded to FP16 (the weights as trained are kept for the modules kept in FP32)."""
    from mptrain.build import seed_everything
    from mptrain.data import build_data
    from mptrain.precision import Precision
    from mptrain.tasks import build_task

    seed_everything(cfg.seed)
    precision = Precision(cfg.precision, device)
    data = build_data(cfg.dataset, device, cfg.seed, augment=False)
    task = build_task(cfg.model, data, precision)
    try:
        state = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)["networks"]
        for name, net in task.networks().items():
            net.load_state_dict(state[name])  # copy_ rounds FP32 / bf16 weights into the FP16 ones
    except Exception as e:
        raise UserError(f"{run_dir / 'checkpoint.pt'} does not load into {cfg.model.name} ({str(e).splitlines()[0][:160]}"
                        "); is it a checkpoint of this model?") from None
    for net in task.networks().values():
        net.eval()
    return task, precision, data.test, state


def measure(task, precision, loader, batches: int) -> list[dict]:
    """Headroom records of every leaf module's output over `batches` held-out batches, in forward order; `fp16`
    says whether the output was FP16 (an FP32 output above 65504 is exact: only its FP16 consumer overflows)."""
    stats: dict[str, torch.Tensor] = {}
    first_bad: dict[str, int] = {}  # module → the call (counted over all modules) whose output first overflowed
    handles = []
    for net_name, net in task.networks().items():
        for name, module in net.named_modules():
            if not list(module.children()):
                handles.append(module.register_forward_hook(_recorder(stats, first_bad, f"{net_name}.{name}")))
    try:
        with torch.no_grad(), precision.kernels():
            for batch in itertools.islice(loader, batches):
                task.eval_step(batch, precision)
    finally:
        for handle in handles:
            handle.remove()
    return [{**headroom.to_record(name, None, v.tolist()), "overflow_call": first_bad.get(name)}
            for name, v in stats.items()]


def first_overflow(records: list[dict]) -> str | None:
    """The module whose output overflowed first in the forward (a module called twice counts at its bad call)."""
    bad = [r for r in records if r["overflow_call"] is not None]
    return min(bad, key=lambda r: r["overflow_call"])["layer"] if bad else None


def _recorder(stats: dict, first_bad: dict, name: str):

    def hook(module, _inputs, output):
        output = output[0] if isinstance(output, (tuple, list)) and output else output
        if not (torch.is_tensor(output) and output.is_floating_point()):
            return
        s = headroom.headroom_stats(output)
        stats[name] = headroom.merge(stats[name], s) if name in stats else s
        amax = s[1].item()  # a host sync per call: this check runs a few batches, not training
        # an FP16 output beyond 65504, or any output no longer finite (an FP32 output above 65504 is exact)
        if name not in first_bad and (not math.isfinite(amax) or (output.dtype == torch.float16 and amax > 65504)):
            first_bad[name] = next(_CALLS)

    return hook


_CALLS = itertools.count()  # the order in which outputs first overflowed (compared within one measure)


def keep_in_fp32(module: nn.Module, trained: dict, fp16_input=None) -> None:
    """Run `module` in FP32: its parameters as trained (not their FP16 rounding, which may have overflowed) and its
    input (no longer cast to FP16 first); its output stays FP32."""
    if fp16_input is not None:
        fp16_input.remove()
    module.float()
    with torch.no_grad():
        for name, p in module.named_parameters(recurse=False):
            p.copy_(trained[name])
    module.register_forward_pre_hook(CastInputs(torch.float32))


def check(task, precision, loader, batches: int, state: dict) -> dict:
    """The FP16 forward's headroom per module, the modules that overflow, and the smallest greedy set of modules
    to keep in FP32 for it not to overflow (with the headroom that set leaves)."""
    modules = {f"{n}.{name}": m for n, net in task.networks().items() for name, m in net.named_modules()}
    fp16_inputs = {}  # FP16 modules downstream of an FP32 one get FP16 inputs (what overflows, overflows there)
    for name, m in modules.items():
        if not list(m.children()) and any(p.dtype == torch.float16 for p in m.parameters(recurse=False)):
            fp16_inputs[name] = m.register_forward_pre_hook(CastInputs(torch.float16))
    first_pass = measure(task, precision, loader, batches)
    overflowing = [r["layer"] for r in sorted(first_pass, key=lambda r: r["overflow_call"] or 0)
                   if r["overflow_call"] is not None]
    keep, records = [], first_pass
    for _ in range(len(modules)):
        first = first_overflow(records)
        if first is None:
            break
        keep.append(first)
        net_name, _, module_name = first.partition(".")
        trained = {k.rpartition(".")[2]: v for k, v in state[net_name].items() if k.rpartition(".")[0] == module_name}
        keep_in_fp32(modules[first], trained, fp16_inputs.pop(first, None))
        records = measure(task, precision, loader, batches)
    else:
        raise UserError("keeping modules in FP32 one by one did not end the overflow; the model's outputs exceed "
                        "FP16 everywhere (train or run it in bf16)")
    least = min((r["headroom_bits_fp16"] for r in records), default=math.inf)
    return {"batches": batches, "layers": first_pass, "overflowing": overflowing, "keep_fp32": keep,
            "headroom_bits_after": least, "amax_after": max((r["amax"] for r in records), default=0.0)}
