"""What a schema field says beyond its type: a one-line meaning, a rule on its value, an example.

`knob(default, help, rule)` declares a field; `check_fields` applies every rule of a schema to a config node and
raises the one-line UserError `<key> must be <rule> (got <value>); e.g. <key>=<example>`. The same words describe a
value OmegaConf refused at composition (`rule_text`), so a wrong type and a wrong range read alike.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from omegaconf import DictConfig, ListConfig, OmegaConf

from mptrain.errors import UserError


@dataclass(frozen=True)
class Rule:
    ok: Callable[[object], bool]
    text: str  # completes "<key> must be ..."


def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


POSITIVE_INT = Rule(lambda v: is_int(v) and v > 0, "a positive integer")
COUNT = Rule(lambda v: is_int(v) and v >= 0, "an integer >= 0")
POSITIVE = Rule(lambda v: is_number(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: is_number(v) and v >= 0, "a number >= 0")
OPEN_UNIT = Rule(lambda v: is_number(v) and 0 < v < 1, "in (0, 1)")
HALF_OPEN_UNIT = Rule(lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")
SEED = Rule(lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2^32) (NumPy's seed range)")
ABOVE_ONE = Rule(lambda v: is_number(v) and v > 1, "a number > 1")


def one_of(*choices) -> Rule:
    words = [_word(c) for c in choices]
    return Rule(lambda v: any(v == c and type(v) is type(c) for c in choices),
                ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0])


def keyword_mapping(text: str) -> Rule:
    """Null, or a mapping with string keys (a `_target_` and its arguments, or keyword arguments)."""
    return Rule(lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) for k in v)), text)


def list_of(rule: Rule, length: int | None = None, text: str | None = None, extra=None) -> Rule:
    """A list whose items each pass `rule` (and, with `extra`, that passes `extra(list)` as a whole)."""

    def ok(v):
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            return False
        return all(rule.ok(item) for item in v) and (extra is None or extra(list(v)))

    size = f"{length} " if length else ""
    return Rule(ok, text or f"a list of {size}items, each {rule.text}")


def knob(default, help: str, rule: Rule | None = None, example=None):
    """A schema field: its default, one line on what it means, and the rule its value must pass."""
    meta = {"help": help, "rule": rule, "example": example}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _word(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _plain(value):
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def _type_rule(hint) -> Rule:
    """The rule a bare type annotation implies (a field without a rule of its own)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return Rule(lambda v: isinstance(v, bool), "true or false")
    if hint is int:
        return Rule(is_int, "an integer")
    if hint is float:
        return Rule(is_number, "a number")
    if hint is str:
        return Rule(lambda v: isinstance(v, str), "a string")
    if origin in (list, typing.List) and args and args[0] in (float, int):
        return list_of(Rule(is_number, "a number"), text="a list of numbers")
    return Rule(lambda v: True, "any value")


def _optional(hint) -> bool:
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


def spec(schema: type, name: str) -> tuple[Rule, bool, object]:
    """(rule, accepts null, example) of one field of a schema."""
    f = next(f for f in dataclasses.fields(schema) if f.name == name)
    hint = typing.get_type_hints(schema)[name]
    rule = f.metadata.get("rule") or _type_rule(hint)
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    example = f.metadata.get("example")
    if example is None:
        example = default
    return rule, _optional(hint) or f.default is None, example


def rule_text(schema: type, name: str) -> str:
    rule, nullable, _ = spec(schema, name)
    return ("null or " if nullable and "null" not in rule.text else "") + rule.text


def example_text(schema: type, name: str) -> str:
    example = spec(schema, name)[2]
    if isinstance(example, (list, tuple)):
        return "[" + ",".join(_word(v) for v in example) + "]"
    return _word(example)


def fail(key: str, schema: type, name: str, value) -> typing.NoReturn:
    raise UserError(f"{key} must be {rule_text(schema, name)} (got {_plain(value)!r}); "
                    f"e.g. {key}={example_text(schema, name)}")


def check_fields(node, schema: type, prefix: str) -> None:
    """Every field of `schema` in `node` passes its rule (nested schemas too); the first that does not fails."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}"
        if f.name not in node:
            continue
        value = node[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            check_fields(value, hints[f.name], key)
            continue
        rule, nullable, _ = spec(schema, f.name)
        if value is None and nullable:
            continue
        if not rule.ok(_plain(value)):
            fail(key, schema, f.name, value)


def help_lines(schema: type, prefix: str):
    """(key, default, meaning) per field, nested schemas flattened: docs/configuration.md's table."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from help_lines(hints[f.name], f"{prefix}.{f.name}")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "(required)" if default is dataclasses.MISSING or default == "???" else _word(default)
        if isinstance(default, (list, tuple)):
            shown = "[" + ", ".join(_word(v) for v in default) + "]"
        yield f"{prefix}.{f.name}", shown, f.metadata.get("help", "")
