"""One typed schema per config group (Hydra structured configs), registered in Hydra's ConfigStore.

Each YAML option extends its group's schema (`defaults: [precision_schema, _self_]`) and keeps only what the
choice changes. OmegaConf checks types while Hydra composes; `validate` checks ranges and cross-field rules,
one module per group, each failure one UserError line. `describe_composition_error` words a value OmegaConf
refused the same way, so `trainer.epochs=abc` and `trainer.epochs=0` read alike. Torch-free: a bad config
answers before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException, ValidationError

from mptrain import families
from mptrain.errors import UserError, first_line
from mptrain.schema import dataset, model, optim, plan, precision, telemetry, trainer
from mptrain.schema.rules import SEED, check_fields, fail, help_lines, is_int  # noqa: F401 (re-exported)

GROUPS = {"dataset": dataset, "model": model, "optim": optim, "precision": precision, "trainer": trainer,
          "telemetry": telemetry}


def _add_family_options() -> None:
    """The model and dataset options each family record brings (mptrain/families.py), into their group's schemas
    (their own modules extend the groups' base schemas, so they are loaded once both groups are)."""
    for group in ("model", "dataset"):
        module = GROUPS[group]
        for option in families.options(group):
            schema = families.load(option.schema)
            module.SCHEMAS[option.schema_name] = schema
            module.BY_NAME.update(dict.fromkeys(option.names, schema))


_add_family_options()
MODES = precision.MODES


def register() -> None:
    """Store every schema as an option of its group (idempotent), for the YAML files' defaults lists."""
    store = ConfigStore.instance()
    for group, module in GROUPS.items():
        for name, schema in module.SCHEMAS.items():
            store.store(group=group, name=name, node=schema)


def is_schema_option(name: str) -> bool:
    return name.endswith("_schema")


def schema_of(group: str, node) -> type:
    """The schema a composed group node follows: its structured type, or (a plain node) the one its name picks."""
    typed = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(typed):
        return typed
    module = GROUPS[group]
    by_name = getattr(module, "BY_NAME", None)
    if by_name is None:
        return next(iter(module.SCHEMAS.values()))
    key = module.schema_key(node) if hasattr(module, "schema_key") else node.get("name")
    if key not in by_name:
        raise UserError(f"unknown {group}.name={key!r}; choose one of {', '.join(by_name)}")
    return by_name[key]


def typed(group: str, node):
    """`node` (perhaps partial: a library caller's dict) over its schema's defaults, every key present and typed,
    each value checked against its rule; a bad one raises the one-line UserError."""
    node = node if isinstance(node, DictConfig) else OmegaConf.create(node)
    schema = schema_of(group, node)
    base = OmegaConf.structured(schema)
    try:
        with open_dict(base):  # keys beyond the schema (++key=...) stay
            merged = OmegaConf.merge(base, node)
    except ValidationError as e:  # a value of the wrong type
        path = re.sub(r"\[\d+\]$", "", str(e.full_key))
        owner = e.object_type if dataclasses.is_dataclass(e.object_type) else schema
        fail(f"{group}.{path}", owner, path.rsplit(".", 1)[-1], OmegaConf.select(node, path))
    check_fields(merged, schema, group)
    return merged


ROOT_KEYS = {*GROUPS, "seed", "plan", "hydra"}  # what a run reads at the top level
_FP16 = ("FP16 runs as mixed (the paper's recipe: FP16 with FP32 master weights and loss scaling), amp "
         "(torch.autocast with GradScaler), fp16_master (no loss scaling) or fp16_naive (FP16 weights, no master); ")
# what a user may type for a mode the options spell otherwise (difflib would suggest fp16 -> bf16)
ALIASES = {("precision", name): _FP16 for name in ("fp16", "float16", "half", "fp16_mixed", "mixed_fp16", "fp16_amp")}
ALIASES |= {("precision", name): "BF16 runs as bf16 (autocast), bf16_pure, bf16_sr or bf16_kahan; "
            for name in ("bfloat16", "bf16_mixed", "bf16_amp")}
ALIASES |= {("precision", name): "FP32 runs as fp32; " for name in ("float32", "float", "full", "single")}


def refuse_schema_choices(overrides) -> None:
    """`model=resnet_schema` names the typed fields behind the options, not an option: one line, not a traceback."""
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key in GROUPS and is_schema_option(value):
            from mptrain.paths import group_options

            options = group_options(key)
            raise UserError(f"{key}={value} is the schema behind the {key} options, not an option; choose one of "
                            f"{', '.join(options)}")


def unread_keys(cfg) -> None:
    """A key that nothing reads (`+trainer.max_step=5`, `+model._target_=...`) is refused in one line, with the
    did-you-mean a plain override gets: a typo must not train the default silently."""
    for key in cfg:
        if key not in ROOT_KEYS:
            close = difflib.get_close_matches(str(key), sorted(ROOT_KEYS - {"hydra"}), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{key} is not a key mptrain reads; {hint}the top level has "
                            f"{', '.join(sorted(ROOT_KEYS - {'hydra'}))}")
    for group in GROUPS:
        node = cfg.get(group)
        if node is None:
            continue
        _unread_in(node, group, schema_of(group, node))


def _unread_in(node, prefix: str, schema: type) -> None:
    import typing

    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    for key in node:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {prefix}.{close[0]}? " if close else ""
            raise UserError(f"{prefix}.{key} is not a key of {prefix}, so nothing would read it; {hint}its keys: "
                            f"{', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(node[key], DictConfig):
            _unread_in(node[key], f"{prefix}.{key}", hints[key])


def validate(cfg) -> None:
    """Ranges and cross-field rules of every group; the first failure raises the one-line UserError."""
    unread_keys(cfg)
    if not SEED.ok(cfg.get("seed")):  # numpy would refuse it later, in a traceback
        raise UserError(f"seed must be {SEED.text} (got {cfg.get('seed')!r}); e.g. seed=0")
    for module in GROUPS.values():
        module.check(cfg)
    plan.check(cfg)  # a root key, not a group: a reproduction preset's pre-registered plan


def describe_composition_error(error: Exception) -> str:
    """One line for what Hydra or OmegaConf refused while composing: a wrong type, an unknown key or option."""
    from hydra.errors import MissingConfigException, OverrideParseException

    cause = error.__cause__ if isinstance(error.__cause__, OmegaConfBaseException) else error
    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        options = [o for o in (error.options or []) if not is_schema_option(o)]
        if group and options:
            close = difflib.get_close_matches(choice, options, n=1)
            hint = ALIASES.get((group, choice.lower())) or (f"did you mean {group}={close[0]}? " if close else "")
            return f"{group}={choice} is not an option of {group}; {hint}choose one of {', '.join(options)}"
    text = str(error)
    ambiguous = re.search(r"Ambiguous value for argument '([^']*)'", text)
    if ambiguous:  # a comma list outside a sweep
        said = ambiguous.group(1)
        key = said.partition("=")[0]
        return (f"{said} gives several values: add -m to run one job per value (mptrain -m {said}), or write "
                f"{key}=[a,b] for a list, {key}='a,b' for one value with a comma")
    unknown_root = re.search(r"Key '([^'.]+)' is not in struct", f"{text}\n{cause}")
    if unknown_root and unknown_root.group(1) not in ROOT_KEYS:  # a misspelt group: precison=mixed
        name = unknown_root.group(1)
        close = difflib.get_close_matches(name, sorted(ROOT_KEYS - {"hydra"}), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{name} is not a config group or key of mptrain; {hint}the top level has {', '.join(sorted(ROOT_KEYS - {'hydra'}))}"
    if isinstance(error, OverrideParseException):
        return (f"cannot read that override ({first_line(error, limit=None)}); the grammar: "
                "https://hydra.cc/docs/advanced/override_grammar/basic/")
    key = re.sub(r"\[\d+\]$", "", getattr(cause, "full_key", None) or "")  # a list's item: the list's key
    name = key.rsplit(".", 1)[-1]
    schema = getattr(cause, "object_type", None)
    if not dataclasses.is_dataclass(schema):
        schema = _declaring_schema(key)
    if key and dataclasses.is_dataclass(schema):
        fields = [f.name for f in dataclasses.fields(schema)]
        if name in fields and isinstance(cause, ValidationError):
            given = _given(error, key)
            try:
                fail(key, schema, name, given)
            except UserError as e:
                return str(e)
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"did you mean {key.rsplit('.', 1)[0]}.{close[0]}? " if close else ""
            return (f"{key} is not a key of {key.rsplit('.', 1)[0]}; {hint}its keys: {', '.join(fields)} "
                    f"(+{key}=... adds one anyway)")
    where, key = re.search(r"^In '([^']+)'", text), re.search(r"full_key: (\S+)", text)
    if where and key and " not in " in text:  # a config file sets a key its group's schema lacks
        return (f"{where.group(1)} sets {key.group(1)}, which is not a key of {key.group(1).rsplit('.', 1)[0]} "
                f"here; drop it from that file or pick an option that has it")
    return first_line(cause, limit=None)


def _declaring_schema(key: str) -> type | None:
    """The first schema of `key`'s group that declares its field (when OmegaConf names no schema: a list item)."""
    group, _, name = key.partition(".")
    for schema in getattr(GROUPS.get(group), "SCHEMAS", {}).values():
        if name in {f.name for f in dataclasses.fields(schema)}:
            return schema
    return None


def _given(error: Exception, key: str):
    """The value the user gave `key`, as text, from Hydra's `Error merging override key=value`."""
    match = re.search(rf"override {re.escape(key)}=(.*)$", str(error).splitlines()[0])
    return match.group(1) if match else "?"


def markdown_table() -> str:
    """docs/configuration.md's table: each key of each schema where it is declared, its default, the options it
    applies to and its meaning."""
    rows = ["| key | default | options | meaning |", "|---|---|---|---|"]
    for group, module in GROUPS.items():
        by_name = getattr(module, "BY_NAME", {})
        for schema in _declaring_order(module):
            own = schema.__dict__.get("__annotations__", {})
            users = [n for n, s in by_name.items() if issubclass(s, schema)]
            options = "all" if not by_name or len(users) == len(by_name) else ", ".join(users)
            for key, default, meaning in help_lines(schema, group):
                if key.split(".")[1] in own:
                    rows.append(f"| `{key}` | `{default}` | {options} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows)


def _declaring_order(module) -> list[type]:
    """A group's schema classes, each base before the classes that extend it."""
    classes: list[type] = []
    for schema in module.SCHEMAS.values():
        for cls in reversed(schema.__mro__):
            if dataclasses.is_dataclass(cls) and cls not in classes:
                classes.append(cls)
    return classes


register()
