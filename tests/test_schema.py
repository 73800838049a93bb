"""The schemas: every key of every group refuses a bad value with the one line, every file in conf/ composes
and validates, README's configuration table is the schema's."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from mptrain import schema
from mptrain.cli import config_dir
from mptrain.errors import UserError
from mptrain.schema import rules

ROOT = Path(__file__).resolve().parents[1]

# bad values per rule, each of the right shape but outside the rule (or of the wrong type)
BAD = {
    rules.POSITIVE_INT: ["0", "-3"], rules.COUNT: ["-1"], rules.POSITIVE: ["0", "-0.5"],
    rules.NON_NEGATIVE: ["-1.0"], rules.OPEN_UNIT: ["0", "1.5"], rules.HALF_OPEN_UNIT: ["1.0", "-0.1"],
    rules.ABOVE_ONE: ["1.0"], rules.SEED: ["-1", "4294967296"], schema.trainer.RESUME: ["' '"],
    schema.dataset.FOLDER: ["' '"], schema.model.NAMED: ["' '"],
    schema.precision.LAYER_NAMES: ["bogus", "\"['']\""],  # [1,2] is fine: nn.Sequential's layers are named 0, 1, ...
}  # fmt: skip
BY_TYPE = {int: ["abc", "2.5"], float: ["abc"], bool: ["maybe"], str: []}


def _option_for(group: str, schema_cls: type) -> list[str]:
    """Overrides that make `group` use `schema_cls` (a model, dataset or optimizer of that schema)."""
    by_name = getattr(schema.GROUPS[group], "BY_NAME", None)
    if not by_name:
        return []
    name = next(n for n, s in by_name.items() if s is schema_cls)
    return [f"{group}={name}"]


def _leaf_fields(schema_cls: type, prefix: str):
    hints = typing.get_type_hints(schema_cls)
    for f in dataclasses.fields(schema_cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", schema_cls, f, hints[f.name]


def _bad_values(f, hint) -> list[str]:
    rule = f.metadata.get("rule")
    values = list(BAD.get(rule, []))
    base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
    if rule is not None and rule not in BAD:  # choices, lists and special rules
        values.append("[1,2,3,4]" if typing.get_origin(base) is list else "bogus")
    if typing.get_origin(base) is list and rule.text.startswith(("two", "three")):
        values.append("[0.5]")  # the wrong length
    values += BY_TYPE.get(base, [])
    return values


CASES = []
for _group, _module in schema.GROUPS.items():
    for _schema in dict.fromkeys([*_module.SCHEMAS.values(), *getattr(_module, "BY_NAME", {}).values()]):
        for _key, _owner, _field, _hint in _leaf_fields(_schema, _group):
            for _value in _bad_values(_field, _hint):
                if _key == "model.name" or _key == "dataset.name" or _key == "optim.name":
                    continue  # a name picks the schema: the unknown-option cases cover it
                CASES.append((_option_for(_group, _schema), _key, _value))


def test_every_numeric_and_list_key_has_bad_values_here():
    keys = {key for _, key, _ in CASES}
    for group, module in schema.GROUPS.items():
        for schema_cls in module.SCHEMAS.values():
            for key, _, _f, hint in _leaf_fields(schema_cls, group):
                base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
                if base in (int, float) or typing.get_origin(base) is list:
                    assert key in keys, key


@pytest.mark.parametrize("choice, key, value", CASES, ids=[f"{k}={v}" for _, k, v in CASES])
def test_every_key_refuses_a_bad_value_in_one_line(compose_cfg, choice, key, value):
    try:
        cfg = compose_cfg(*choice, f"{key}={value}")
    except ConfigCompositionException as e:  # a wrong type: refused while composing (mptrain.cli words it)
        message = schema.describe_composition_error(e)
    else:
        with pytest.raises(UserError) as refused:
            schema.validate(cfg)
        message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{key} must be "), message
    assert re.search(rf"; e\.g\. {re.escape(key)}=\S", message), message
    if not message.startswith(f"{key} must be null"):  # the example itself passes
        example = message.rsplit(f"{key}=", 1)[1]
        schema.validate(compose_cfg(*choice, f"{key}={example}"))


@pytest.mark.parametrize("path", sorted(Path(config_dir()).glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_file_composes_and_validates(compose_cfg, path):
    group = path.parent.name
    if group in ("hydra", "launcher"):
        pytest.skip("a Hydra launcher config (needs hydra-submitit-launcher)")
    choice = f"+{group}={path.stem}" if group == "experiment" else f"{group}={path.stem}"
    if group == "hparams_search":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    needs = {"precision/bf16_kahan": ["optim.nesterov=false"]}  # optimi's SGD has no Nesterov (refused otherwise)
    cfg = compose_cfg(choice, *needs.get(f"{group}/{path.stem}", []))
    schema.validate(cfg)
    if group in schema.GROUPS:
        assert dataclasses.is_dataclass(schema.schema_of(group, cfg[group]))


def test_each_group_keeps_its_schema_in_the_config_store():
    repo = ConfigStore.instance().repo
    for group, module in schema.GROUPS.items():
        stored = {name.removesuffix(".yaml") for name in repo[group]}
        assert set(module.SCHEMAS) <= stored, group


def test_docs_configuration_table_is_the_schemas():
    page = (ROOT / "docs" / "configuration.md").read_text()
    block = re.search(r"<!-- config-table -->\n(.*?)\n<!-- /config-table -->", page, re.S)
    assert block, "docs/configuration.md lacks the <!-- config-table --> block (python -m mptrain.schema writes it)"
    assert block.group(1).strip() == schema.markdown_table().strip(), "run: python -m mptrain.schema --docs"


def test_a_partial_library_config_takes_the_schema_defaults():
    cfg = schema.typed("model", {"name": "lstm_lm", "width": 16})
    assert cfg.width == 16 and cfg.layers == 2 and cfg.tie_weights is True
    with pytest.raises(UserError, match=r"^model.width must be a positive integer \(got 'wide'\)"):
        schema.typed("model", {"name": "lstm_lm", "width": "wide"})
