"""What FP16 does to a model's numbers: gradient exponent ranges and lost updates.

Every `telemetry.numerics.every` steps (off by default: no hook exists otherwise):

* Gradient ranges (the paper's Fig. 2b and 3): for each weight gradient (per
  parameter tensor) and each activation gradient (per leaf-module output), the
  histogram of floor(log2|g|) in FP32 on the *unscaled* values, and the fractions
  that are exactly zero, below 2^-24 (flushed to zero in FP16), in [2^-24, 2^-14)
  (subnormal) and above 65504 (overflow) — unscaled and as scaled by the loss scale
  in effect. Hooks see the gradients as backward produces them (scaled); dividing
  by the scale in FP32 recovers the values the model's math means.
* Forward headroom (`telemetry/headroom.py`): per leaf module's output, the amax and the shares of values
  above, and within 2x, 4x, 16x of, the FP16 / bf16 / FP8 E4M3 maxima; the first module whose output would
  overflow FP16 (`kind: forward_first_overflow` in numerics.jsonl).
* FP8 operands (`telemetry/fp8_stats.py`): per Linear layer, what tensorwise FP8 scaling does to its input,
  weight (E4M3) and output gradient (E5M2): amax, scale, shares that underflow or turn subnormal.
* Block-scaled operands (`telemetry/mx_stats.py`, precision=mx): per Linear layer, operand and product, the
  shares flushed inside their block and clamped at the element max, blocks whose scale hit its range, and the
  quantisation error.
* Optimizer-state precision (`optim.state`): per weight, the moments as stored (8-bit, 4-bit, FP8, BF16, read
  back) against those an FP32 twin computes from the same state this step: ||m - m_fp32|| / ||m_fp32||, what
  storing them rounded away (torchao updates with the FP32 moments of the step; the rounding reaches the next).
* Lost updates (the paper's case for master weights): with FP32 weights or masters, the fraction of weight
  elements whose update this step is smaller than half an FP16 ulp of the weight, i.e. would vanish if added
  in FP16. Where weights are updated in their own FP16/bf16 (fp16_naive, bf16_pure, bf16_sr, bf16_kahan;
  `telemetry/lost_updates.py`): against the update an FP32 twin of the optimizer computes, the share nearest
  rounding drops, the share that did not move, and how much of the dropped update mass was kept.

Each measurement goes to TensorBoard (`numerics/grad_log2/<layer>` histograms,
`numerics/<fraction>/<layer>` scalars, `.../all` overall) and one JSON line per
layer to `numerics.jsonl` in the run dir, for the report.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch
from torch import nn

from mptrain.telemetry import fp8_stats, headroom, lost_updates, mx_stats

FP16_TINY = 2.0**-24  # smallest FP16 subnormal: anything smaller flushes to zero
FP16_MIN_NORMAL = 2.0**-14
FP16_MAX = 65504.0
EXPONENTS = torch.arange(-64, 18)  # histogram bins of floor(log2|g|); the end bins take what lies beyond
FRACTIONS = ("zero", "underflow", "subnormal", "overflow")
SUMS = ("count", *FRACTIONS, *(f"{f}_scaled" for f in FRACTIONS[1:]))


def gradient_stats(grad: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """[count, zero, underflow, subnormal, overflow, underflow/subnormal/overflow once scaled, *histogram] on the device.

    One joint count per element instead of a dozen passes: the FP32 exponent bits of the
    unscaled value (|g| / scale) times the FP16 band of the value as backward produced it
    (zero, flushed, subnormal, normal, overflow); everything else is a fixed sum over that
    table. No boolean indexing or bincount: no host sync on a GPU.
    """
    magnitude = torch.nan_to_num(grad.detach().float().abs(), nan=torch.inf).flatten()  # NaN counts as overflow
    scaled_band = torch.bucketize(magnitude, _scaled_edges(grad.device), right=True, out_int32=True)
    unscaled = magnitude / scale
    exponent_bits = unscaled.view(torch.int32) >> 23  # biased FP32 exponent: floor(log2 x) + 127, 255 = inf
    joint = torch.zeros(256 * _BANDS, device=grad.device)
    joint.index_add_(0, exponent_bits * _BANDS + scaled_band, torch.ones(1, device=grad.device).expand(len(magnitude)))
    stats = joint @ _projection(grad.device)
    overflow = (unscaled > FP16_MAX).sum().float()  # exact at 65504, which is no power of two
    return torch.cat([stats[:4], overflow.view(1), stats[5:]])


_BANDS = 5  # of a scaled value in FP16: 0 zero, 1 flushed, 2 subnormal, 3 normal, 4 overflow


@functools.cache
def _scaled_edges(device: torch.device) -> torch.Tensor:
    above_max = torch.nextafter(torch.tensor(FP16_MAX), torch.tensor(math.inf)).item()
    return torch.tensor([2.0**-149, FP16_TINY, FP16_MIN_NORMAL, above_max], device=device)


@functools.cache
def _projection(device: torch.device) -> torch.Tensor:
    """(exponent bits, scaled band) table -> the SUMS and the histogram (column 4, overflow, is counted apart)."""
    rows = torch.zeros(256, _BANDS, len(SUMS) + len(EXPONENTS))
    biased = torch.arange(256).view(-1, 1)
    band = torch.arange(_BANDS).view(1, -1)
    nonzero = band > 0
    exponent = biased - 127  # 0 (zero or below FP32's normal range) sits with the smallest
    rows[..., 0] = 1
    rows[..., 1] = (band == 0).float()
    rows[..., 2] = (nonzero & (exponent < -24)).float()
    rows[..., 3] = (nonzero & (exponent >= -24) & (exponent < -14)).float()
    for column, b in ((5, 1), (6, 2), (7, 4)):
        rows[..., column] = (band == b).float()
    bins = (exponent.clamp(int(EXPONENTS[0]), int(EXPONENTS[-1])) - int(EXPONENTS[0])).expand(256, _BANDS)
    rows[..., len(SUMS):].scatter_(-1, bins.unsqueeze(-1), nonzero.expand(256, _BANDS).unsqueeze(-1).float())
    return rows.view(256 * _BANDS, -1).to(device)


def half_ulp_fp16(weights: torch.Tensor) -> torch.Tensor:
    """Half the spacing of FP16 numbers at each weight (subnormals: 2^-25)."""
    w = weights.detach().to(torch.float16).float().abs()
    exponent = torch.frexp(w).exponent - 1  # floor(log2|w|) for w != 0
    exponent = torch.where(w > 0, exponent.clamp_min(-14), torch.full_like(exponent, -14))
    return torch.exp2((exponent - 11).float())


class NumericsProbe:
    def __init__(self, every: int, run_dir: Path, activations: bool = True, observe_mx=None):
        self.every = every
        self.activations = activations
        self.observe_mx = observe_mx  # an mx.Recipe: report what it would do to high-precision Linear layers
        self.path = Path(run_dir) / "numerics.jsonl"
        self._stats: dict[tuple[str, str], torch.Tensor] = {}
        self._forward: dict[str, torch.Tensor] = {}  # headroom per module, in the order the forward ran them
        self._fp8: dict[str, torch.Tensor] = {}  # per Linear operand: what tensorwise FP8 scaling does to it
        self._mx: dict[str, torch.Tensor] = {}  # per MX Linear operand and product: what its block format does

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @contextlib.contextmanager
    def capture(self, networks: dict[str, nn.Module], steppers: dict):
        """Hooks for one training step; on exit, the lost updates of that step."""
        handles, before, intended, update_hooks = [], {}, {}, []
        for net_name, net in networks.items():
            stepper = steppers[net_name]
            scale = _scale_in_effect(stepper)
            for name, p in net.named_parameters():
                if p.requires_grad:
                    handles.append(p.register_hook(self._recorder("weight", f"{net_name}.{name}", scale)))
            if self.activations:
                for name, module in net.named_modules():
                    if not list(module.children()):
                        handles.append(module.register_forward_hook(self._output_hook(f"{net_name}.{name}", scale)))
                    if isinstance(module, nn.Linear):
                        handles.append(module.register_forward_hook(self._fp8_hook(f"{net_name}.{name}", scale)))
                    if hasattr(module, "mx_recipe"):  # precision=mx: the layer reports its own quantisation
                        module.mx_sink = self._mx_sink(f"{net_name}.{name}")
                        handles.append(_Unset(module, "mx_sink"))
                    elif self.observe_mx is not None and isinstance(module, nn.Linear):
                        from mptrain.precision import mx

                        if mx.fits(module, self.observe_mx):
                            handles += mx.observe(module, self.observe_mx, self._mx_sink(f"{net_name}.{name}"))
            before[net_name] = [p.detach().clone() for p in stepper.params]
            if _own_precision_weights(net, stepper):  # the update each weight was meant to get, in FP32
                def keep_intended(optimizer, params=stepper.params, key=net_name):
                    intended[key] = (lost_updates.fp32_update(optimizer, params),
                                     lost_updates.effective_weights(optimizer, params))
                stepper.pre_update_hooks.append(keep_intended)
                update_hooks.append((stepper, keep_intended))
            elif lost_updates.low_precision_state(getattr(stepper, "optimizer", None)):  # optim.state: the moments FP32 would hold
                def keep_intended(optimizer, params=stepper.params, key=net_name):
                    intended[key] = lost_updates.fp32_moments(optimizer, params)
                stepper.pre_update_hooks.append(keep_intended)
                update_hooks.append((stepper, keep_intended))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for stepper, hook in update_hooks:
                stepper.pre_update_hooks.remove(hook)
        for net_name, stepper in steppers.items():
            names = [f"{net_name}.{n}" for n, p in networks[net_name].named_parameters() if p.requires_grad]
            if _own_precision_weights(networks[net_name], stepper):
                if net_name not in intended:
                    continue  # the step was skipped: nothing was meant to move
                updates, effective = intended[net_name]
                after = lost_updates.effective_weights(stepper.optimizer, stepper.params)
                for name, old, p, u, e0, e1 in zip(names, before[net_name], stepper.params, updates, effective, after):
                    self._stats[("lost_update", name)] = lost_updates.update_stats(old.float(), e0, e1, u, p.dtype)
                continue
            for name, old, new in zip(names, before[net_name], stepper.params):
                self._stats[("lost_update", name)] = self._lost(old, new)
            for name, p, exact in zip(names, stepper.params, intended.get(net_name, ())):
                if exact:
                    stored = stepper.optimizer.state[p]
                    self._stats[("optimizer_state", name)] = lost_updates.moment_stats(stored, exact)

    def _recorder(self, kind: str, name: str, scale):
        def record(grad):
            if grad is not None and grad.is_floating_point():
                stats = gradient_stats(grad, scale)
                key = (kind, name)
                self._stats[key] = self._stats[key] + stats if key in self._stats else stats
            return None

        return record

    def _output_hook(self, name: str, scale):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)) and output:
                output = output[0]  # recurrent layers return (sequence, state): the sequence is the activation
            if not (torch.is_tensor(output) and output.is_floating_point()):
                return
            self.record_forward(name, output)
            if output.requires_grad:
                output.register_hook(self._recorder("activation", name, scale))

        return hook

    def _fp8_hook(self, name: str, scale):
        def hook(module, inputs, output):
            if not (inputs and torch.is_tensor(inputs[0]) and torch.is_tensor(output)):
                return
            self._record_fp8(f"{name}.input", inputs[0], "e4m3")
            self._record_fp8(f"{name}.weight", module.weight, "e4m3")
            if output.requires_grad:
                output.register_hook(lambda g: self._record_fp8(f"{name}.grad_output", g / scale, "e5m2"))

        return hook

    def _mx_sink(self, layer: str):
        def sink(key: str, fmt: str, stats: torch.Tensor) -> None:
            name, stats = f"{layer}.{key}", mx_stats.operand_stats(stats, fmt)
            self._mx[name] = mx_stats.merge(self._mx[name], stats) if name in self._mx else stats

        return sink

    def _record_fp8(self, key: str, tensor: torch.Tensor, fmt: str) -> None:
        stats = fp8_stats.operand_stats(tensor, fmt)
        self._fp8[key] = fp8_stats.merge(self._fp8[key], stats) if key in self._fp8 else stats

    def record_forward(self, name: str, output: torch.Tensor) -> None:
        stats = headroom.headroom_stats(output)
        self._forward[name] = headroom.merge(self._forward[name], stats) if name in self._forward else stats

    @staticmethod
    def _lost(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """FP32 weights (or FP32 masters): the updates FP16 weights would have lost (below half an FP16 ulp)."""
        delta = new.detach().float() - old.float()
        lost = (delta != 0) & (delta.abs() < half_ulp_fp16(old))
        return torch.stack([torch.tensor(float(delta.numel()), device=delta.device), lost.sum().float()])

    def take(self) -> dict[tuple[str, str], list[float]]:
        """The sums the last capture measured, by (kind, layer), read in one host sync; then forget them."""
        stats, self._stats = self._stats, {}
        stats.update({("forward", name): v for name, v in self._forward.items()})
        stats.update({("fp8", name): v for name, v in self._fp8.items()})
        stats.update({("mx", name): v for name, v in self._mx.items()})
        self._forward, self._fp8, self._mx = {}, {}, {}
        if not stats:
            return {}
        values = torch.stack([torch.nn.functional.pad(v, (0, len(SUMS) + len(EXPONENTS) - len(v))) for v in stats.values()])
        return {key: row[: len(stats[key])] for key, row in zip(stats, values.tolist())}

    def flush(self, tb, step: int) -> None:
        """Write what the last capture measured and forget it."""
        taken = self.take()
        if not taken:
            return
        keys, values = list(taken), list(taken.values())
        totals: dict[str, list[float]] = {}
        scalars, histograms, forward = {}, {}, []
        by_layer: dict[str, list[float]] = {}  # one TensorBoard tag per instrument: its per-layer values
        with open(self.path, "a") as out:
            for (kind, layer), v in zip(keys, values):
                record = self.to_record(kind, layer, step, v)
                out.write(json.dumps(record) + "\n")  # every layer's figures, for the report and mptrain-numerics
                for tag, value in _fraction_tags(record).items():
                    by_layer.setdefault(tag.rpartition("/")[0], []).append(value)
                if kind in ("fp8", "mx"):
                    continue  # per operand only: no "all" total
                if kind == "forward":
                    forward.append(record)
                merge = headroom.merge_lists if kind == "forward" else lambda a, b: [x + y for x, y in zip(a, b)]
                totals[kind] = merge(totals[kind], v) if kind in totals else v
            if forward:
                first = {"step": step, "kind": "forward_first_overflow", "layer": headroom.first_overflow(forward)}
                out.write(json.dumps(first) + "\n")
        for kind, v in totals.items():
            record = self.to_record(kind, "all", step, v)
            scalars.update(_fraction_tags(record))
            if kind == "forward":
                scalars["numerics/forward_amax/all"] = record["amax"]
            elif kind == "optimizer_state":
                scalars["numerics/moment_error/all"] = record["moment_error"]
            elif kind != "lost_update":
                histograms[f"numerics/grad_log2/{kind}/all"] = record["log2_hist"]
        tb.scalars(scalars, step)
        tb.histograms_raw(histograms, EXPONENTS.tolist(), step)
        tb.histograms_raw(*_layer_histograms(by_layer), step)

    @staticmethod
    def to_record(kind: str, layer: str, step: int | None, v: list[float]) -> dict:
        n = v[0] or 1.0
        if kind == "forward":
            return headroom.to_record(layer, step, v)
        if kind == "fp8":
            return fp8_stats.to_record(layer, step, v)
        if kind == "mx":
            return mx_stats.to_record(layer, step, v)
        if kind == "lost_update":
            return {"step": step, "kind": kind, "layer": layer, "count": v[0], "lost_update_frac": v[1] / n,
                    **lost_updates.to_fields(v)}  # fmt: skip
        if kind == "optimizer_state":
            return {"step": step, "kind": kind, "layer": layer, "count": v[0],
                    "moment_error": math.sqrt(v[1] / v[2]) if v[2] > 0 else 0.0}
        sums = dict(zip(SUMS, v[: len(SUMS)]))
        record = {"step": step, "kind": kind, "layer": layer, "count": v[0]}
        record.update({f"{k}_frac": sums[k] / n for k in SUMS[1:]})
        record["log2_hist"] = v[len(SUMS):]
        return record


class _Unset:
    """A handle that, removed, sets a module's attribute back to None (like a hook's)."""

    def __init__(self, module: nn.Module, attribute: str):
        self.module, self.attribute = module, attribute

    def remove(self) -> None:
        setattr(self.module, self.attribute, None)


def _own_precision_weights(net: nn.Module, stepper) -> bool:
    """Weights updated in their own low precision, no FP32 master (fp16_naive, bf16_pure, bf16_sr, bf16_kahan)."""
    return stepper.masters is None and next(iter(net.parameters())).dtype in lost_updates.LOW


def _scale_in_effect(stepper):
    """The loss scale this step's backward runs under (a copy: the scaler updates its own in place)."""
    scale = stepper.current_scale
    return 1.0 if scale is None else scale.detach().clone()


PERCENT_BINS = list(range(101))  # a share in percent (bin p holds [p, p+1) %), or headroom in whole bits


def _layer_histograms(by_layer: dict[str, list[float]]) -> tuple[dict[str, list[float]], list[int]]:
    """`numerics/by_layer/<instrument>/<kind>`: how many layers sit at each share, in percent bins (forward headroom:
    in bits, 0 holding an overflow); each layer's own figure is in numerics.jsonl and the report."""
    histograms = {}
    for tag, values in by_layer.items():
        bits = "headroom_bits" in tag
        counts = [0.0] * len(PERCENT_BINS)
        for v in values:
            if not math.isfinite(v):
                continue
            index = min(max(int(math.floor(v if bits else 100 * v)), 0), len(PERCENT_BINS) - 1)
            counts[index] += 1
        histograms[tag.replace("numerics/", "numerics/by_layer/", 1)] = counts
    return histograms, PERCENT_BINS


def _fraction_tags(record: dict) -> dict[str, float]:
    """`numerics/underflow_frac/weight/<layer>`, ..., `numerics/lost_update_frac/<layer>`."""
    where = record["layer"] if record["kind"] == "lost_update" else f"{record['kind']}/{record['layer']}"
    shown = (lambda k: "_fp16_" in k) if record["kind"] == "forward" else (lambda k: True)  # bf16/E4M3: jsonl only
    tags = {f"numerics/{k}/{where}": v for k, v in record.items() if k.endswith("_frac") and shown(k)}
    if record["kind"] == "mx":
        tags[f"numerics/rel_error/mx/{record['layer']}"] = record["rel_error"]
    if record["kind"] == "forward" and math.isfinite(record["headroom_bits_fp16"]):
        tags[f"numerics/headroom_bits_fp16/{record['layer']}"] = record["headroom_bits_fp16"]
    return tags
