"""Check a composed config before anything is built (no torch import: bad input fails fast).

Each failure is one UserError line naming the key, the rule, the value and a fix.
"""

from __future__ import annotations

import numbers

from mptrain.errors import UserError


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _fail(key: str, rule: str, value, example: str):
    raise UserError(f"{key} must be {rule} (got {value!r}); e.g. {key}={example}")


def _check(cfg, key: str, ok, rule: str, example: str, optional: bool = False):
    value = _get(cfg, key)
    if value is None and optional:
        return
    if not ok(value):
        _fail(key, rule, value, example)


def positive_int(cfg, key: str, default: int, group: str) -> int:
    """`cfg[key]` (or `default`) if it is a positive integer, else the one-line error for `group.key`."""
    value = cfg.get(key, default)
    if not (_is_int(value) and value > 0):
        _fail(f"{group}.{key}", "a positive integer", value, str(default))
    return value


def validate_config(cfg) -> None:
    pos_int = lambda v: _is_int(v) and v > 0  # noqa: E731
    pos_num = lambda v: _is_number(v) and v > 0  # noqa: E731
    _check(cfg, "seed", _is_int, "an integer", "0")
    _check(cfg, "dataset.batch_size", pos_int, "a positive integer", "128")
    _check(cfg, "optim.lr", pos_num, "a number > 0", "0.1")
    _check(cfg, "optim.weight_decay", lambda v: _is_number(v) and v >= 0, "a number >= 0", "5e-4")
    _check(cfg, "optim.max_grad_norm", pos_num, "null or a number > 0", "1.0", optional=True)
    _check(cfg, "optim.warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0", "100")
    if "momentum" in cfg.optim:
        _check(cfg, "optim.momentum", lambda v: _is_number(v) and 0 <= v < 1, "in [0, 1)", "0.9")
    if "eps" in cfg.optim:
        _check(cfg, "optim.eps", pos_num, "a number > 0", "1e-8")
    _check(cfg, "trainer.epochs", pos_int, "a positive integer", "10")
    _check(cfg, "trainer.max_steps", pos_int, "null or a positive integer", "1000", optional=True)
    _check(cfg, "trainer.log_every", pos_int, "a positive integer", "50")
    _check(cfg, "trainer.eval_max_batches", pos_int, "null or a positive integer", "10", optional=True)
    _check(cfg, "trainer.eval_every", pos_int, "null or a positive integer", "200", optional=True)
    _check(cfg, "trainer.checkpoint_every", pos_int, "null or a positive integer", "500", optional=True)
    _check(cfg, "trainer.resume", lambda v: isinstance(v, str) and v.strip() != "", "null, auto or a run dir",
           "auto", optional=True)
    _check(cfg, "trainer.devices", pos_int, "a positive integer", "2")
    for flag in ("channels_last", "compile"):
        _check(cfg, f"trainer.{flag}", lambda v: isinstance(v, bool), "true or false", "true")
    if cfg.trainer.get("compile") and cfg.telemetry.numerics.every:
        raise UserError("trainer.compile with telemetry.numerics.every: the numerics hooks on every layer would "
                        "recompile the model; measure numerics without trainer.compile")
    _check(cfg, "trainer.media_every", pos_int, "a positive integer", "100")
    _check(cfg, "telemetry.numerics.every", pos_int, "null or a positive integer", "100", optional=True)
    _check(cfg, "telemetry.overflow_events", pos_int, "a positive integer", "20")
    _check(cfg, "trainer.perf_warmup_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0", "10")
    _check(cfg, "trainer.progress", lambda v: v in ("auto", True, False), "auto, true or false", "auto")
    device = cfg.trainer.device
    if not (device in ("auto", "cpu", "cuda") or (isinstance(device, str) and device.startswith("cuda:"))):
        _fail("trainer.device", "auto, cpu, cuda or cuda:N", device, "cpu")
    _validate_precision(cfg)


def _validate_precision(cfg) -> None:
    p = cfg.precision
    scale = p.loss_scale
    if not (scale is None or scale == "dynamic" or (_is_number(scale) and scale > 0)):
        _fail("precision.loss_scale", "dynamic, null or a number > 0", scale, "dynamic")
    _check(cfg, "precision.init_scale", lambda v: _is_number(v) and v > 0, "a number > 0", "65536")
    _check(cfg, "precision.growth_factor", lambda v: _is_number(v) and v > 1, "a number > 1", "2.0")
    _check(cfg, "precision.backoff_factor", lambda v: _is_number(v) and 0 < v < 1, "in (0, 1)", "0.5")
    _check(cfg, "precision.growth_interval", lambda v: _is_int(v) and v > 0, "a positive integer", "2000")
    _check(cfg, "precision.hysteresis", lambda v: _is_int(v) and v > 0, "a positive integer", "1")
    _check(cfg, "precision.min_scale", lambda v: _is_number(v) and v > 0, "a number > 0", "1e-4")
    for flag in ("keep_batchnorm_fp32", "allow_tf32"):
        _check(cfg, f"precision.{flag}", lambda v: isinstance(v, bool), "true or false", "true")
    if p.mode == "amp" and scale == "dynamic" and p.hysteresis != 1:
        raise UserError(
            "precision=amp uses torch.amp.GradScaler, which has no hysteresis; "
            "use precision=mixed for precision.hysteresis>1, or set precision.hysteresis=1"
        )
