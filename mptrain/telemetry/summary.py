"""summary.json (what the report reads) and the one-screen table printed at the end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SUMMARY_FILE = "summary.json"


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json_atomic(path: Path, content) -> Path:
    """Write atomically: a crash mid-write never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(_clean(content), f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves no half-written file beside the whole one
    return path


def write_summary(run_dir: Path, summary: dict) -> Path:
    return write_json_atomic(Path(run_dir) / SUMMARY_FILE, summary)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_scale(value) -> str:
    """A loss scale as people write it: 65536 (2^16), 0.5 (2^-1); a scale that is no power of two as a number."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return _fmt(value)
    exponent = math.log2(value)
    if exponent == int(exponent):
        shown = f"{int(value)}" if value >= 1 else f"{value:g}"
        return f"{shown} (2^{int(exponent)})"
    return f"{value:.6g}"


def format_value(tag: str, value) -> str:
    """A logged scalar for the log line: loss scales as `format_scale`, the rest to 4 significant digits."""
    return format_scale(value) if "loss_scale" in tag else f"{value:.4g}"


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _kernels(s: dict) -> tuple[str, str]:
    """The kernels row: FP16's, or BF16's for a BF16 mode."""
    name = "bf16" if s.get("bf16_kernels") else "fp16"
    kernels = s.get(f"{name}_kernels")
    if kernels == "emulated":
        where = {"layers": "; computed in the Linear/conv layers", "dispatch mode": "; through a dispatch mode over "
                 "every op"}.get(s.get("emulation"), "")
        kernels = f"emulated ({name.upper()} values, FP32 arithmetic inside each product: precision.cpu_{name}{where})"
    return f"{name} kernels", kernels or "none (no FP16 arithmetic in this mode)"


def describe(verdict: dict) -> str:
    from mptrain.telemetry.scale_history import describe as words

    return words(verdict)


def _updates(s: dict) -> str:
    """`468 applied, 0 skipped`, per network for a GAN (`g: 100 applied, 2 skipped; d: ...`)."""
    steps, by_net = s.get("steps"), s.get("skipped_steps_by_network")
    if not isinstance(steps, int):
        return "-"
    skipped = by_net if isinstance(by_net, dict) else {"": s.get("skipped_steps") or 0}
    parts = [f"{name + ': ' if name else ''}{steps - n} applied, {n} skipped" + (f" ({100 * n / steps:.1f} %)"
             if n and steps else "") for name, n in skipped.items()]  # fmt: skip
    return "; ".join(parts)


def _arithmetic(s: dict) -> str:
    """How FP16 products accumulated and reductions ran (the paper's sec. 3.3)."""
    a = s.get("arithmetic")
    if not a:
        return "-"
    accumulate = "FP32" if a.get("accumulate") != "fp16" else f"FP16, blocks of {a.get('accumulate_block')}"
    norms = f"; norms in {a['norms'].upper()}" if a.get("norms") else ""
    return f"products accumulate in {accumulate}; reductions in {str(a.get('reductions', 'fp32')).upper()}{norms}"


def _scales(value) -> str:
    if isinstance(value, dict):  # a GAN's per-network scales
        return "; ".join(f"{name}: {format_scale(v)}" for name, v in value.items())
    return format_scale(value)


def format_summary(s: dict) -> str:
    primary = s.get("primary_metric")
    final, best = s.get("final") or {}, s.get("best") or {}
    rows = [
        ("status", s.get("status")),
        ("run", f"{s.get('model')} / {s.get('dataset')} / {s.get('precision')} / seed {s.get('seed')}"),
        ("steps", f"{s.get('steps')} ({_fmt(s.get('epochs'))} epochs)"),
    ]
    if s.get("parameters"):
        rows.append(("parameters", f"{s['parameters']['total']:,} ({s['parameters']['trainable']:,} trainable)"))
    if primary:
        rows.append((f"eval {primary}", f"final {_fmt(final.get(primary))}, best {_fmt(best.get(primary))}"))
    if "loss" in final:
        rows.append(("eval loss", _fmt(final.get("loss"))))
    rows += [
        _kernels(s),
        ("fp16 arithmetic", _arithmetic(s)),
        ("samples/s", _fmt(s.get("samples_per_s"))),
        ("peak memory", f"{_mib(s.get('peak_memory_bytes'))} ({s.get('peak_memory_method')})"),
        ("updates", _updates(s)),
        ("final loss scale", _scales(s.get("final_loss_scale"))),
        *(((f"loss scale {name}" if len(s["loss_scale_verdict"]) > 1 else "loss scale"), describe(v))
          for name, v in (s.get("loss_scale_verdict") or {}).items()),
        ("wall time", f"{_fmt(s.get('wall_time_s'))} s"),
        ("device", f"{(s.get('env') or {}).get('device_name')} (torch {(s.get('env') or {}).get('torch')})"),
    ]
    if s.get("error"):
        rows.append(("error", s["error"]))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])
