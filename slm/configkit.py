"""Config machinery for the one typed config system: dataclasses ↔ YAML recipes ↔ CLI flags.

Every section of a recipe is a dataclass (each sub-package owns its own sections); the whole
recipe is ``Recipe``. The same fields are:
  * read from YAML (``load_recipe``), with unknown fields rejected by name and a suggestion;
  * exposed as ``--section.field VALUE`` command-line flags (``add_flags`` / ``apply_flags``);
  * validated by each section's ``validate()`` (a ``ConfigError`` names the field and the fix).
No config is ever executed: YAML is parsed with a ``yaml.SafeLoader`` that also refuses a key
repeated in one mapping (``load_yaml``); a syntax error names the file or flag, line and fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any

import yaml

from slm.errors import SlmError


class ConfigError(SlmError, ValueError):
    """A recipe or flag is wrong; the message names the field and says how to fix it."""


# --------------------------------------------------------------------------------------------
# YAML
# --------------------------------------------------------------------------------------------

class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (plain ``safe_load`` keeps the last silently)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a repeated key (merge keys ``<<`` aside: a key
    given explicitly next to a merge overrides the merged one, as YAML says)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base constructor reports an unhashable key
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(
                        "while constructing a mapping", node.start_mark,
                        f"duplicate key '{key}' at line {line} (first given at line {first[key]})",
                        key_node.start_mark)
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line, column) in a YAML error."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    if not what:
        what = str(e)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{what}".split())


def load_yaml(text: str, where: str, fix: str = "fix the YAML syntax there") -> Any:
    """Parse ``text`` safely (UniqueKeyLoader); a syntax error or a repeated key is a one-line
    ConfigError naming ``where`` (a file, or a flag), the line and ``fix``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as e:
        raise ConfigError(f"{where} has a {e.problem}; keep only one of them (merge the two "
                          "into one entry)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML ({_yaml_problem(e)}); {fix}") from None


# --------------------------------------------------------------------------------------------
# Generic machinery
# --------------------------------------------------------------------------------------------

def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return isinstance(tp, type) and is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/CLI value into ``tp``; raise ConfigError naming ``where`` when it does not fit."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if _is_section(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:  # '1e6' style sizes
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        if isinstance(value, int):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}; give a "
                              "number such as 0.001 (not inf or nan)")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def from_dict(cls, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are an error naming the closest field."""
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known fields: {', '.join(names)}."
            raise ConfigError(f"unknown recipe field '{path}'.{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def validate(obj: Any, where: str = "") -> None:
    """Run ``validate()`` on a section and, recursively, on every nested section."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            validate(value, f"{where}.{f.name}" if where else f.name)
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}" if where else str(e)) from None


def finite(section: Any, *names: str) -> None:
    """Raise ConfigError when a numeric field (or an item of a list field) is inf or NaN."""
    for name in names:
        value = getattr(section, name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"field '{name}' must be a finite number, got {value!r}; "
                                  "set it to a number such as 0.001 (not inf or nan)")


def positive(section: Any, *names: str, allow_zero: bool = False) -> None:
    """Raise ConfigError when a numeric field is inf/NaN, negative, or zero (unless
    ``allow_zero``)."""
    for name in names:
        finite(section, name)
        value = getattr(section, name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v < 0 or (v == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"field '{name}' must be {bound}, got {value!r}; set it to a positive size")


def distinct(section: Any, *names: str) -> None:
    """Raise ConfigError when a list field holds a value twice (a sweep axis listed twice
    would run every trial of that value twice, under one key)."""
    for name in names:
        values = getattr(section, name)
        dup = [v for i, v in enumerate(values) if v in values[:i]]
        if dup:
            raise ConfigError(f"field '{name}' lists {sorted(set(map(str, dup)))} more than once; "
                              "list each value once")


def check_seeds(name: str, seeds: list[int]) -> None:
    """Raise ConfigError when a list of seeds (field ``name``) holds anything but non-negative
    integers, or a seed twice."""
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"field '{name}' has {s!r}; a seed is a non-negative integer, e.g. [0, 1]")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ConfigError(f"field '{name}' lists seed(s) {dup} more than once; list each seed once")


# --------------------------------------------------------------------------------------------
# CLI flags generated from the same fields
# --------------------------------------------------------------------------------------------

def iter_leaf_fields(cls, prefix: str = ""):
    """Yield (dotted_name, type, help) for every leaf field of a (nested) dataclass."""
    hints = _hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_section(tp):
            yield from iter_leaf_fields(tp, name + ".")
        else:
            yield name, tp, f.metadata.get("help", "")


def add_flags(parser, cls) -> None:
    """Add one ``--a.b`` flag per leaf field of dataclass ``cls`` to an argparse parser."""
    group = parser.add_argument_group("recipe fields (override the recipe; lists as YAML, e.g. '[1, 2]')")
    for name, tp, help_ in iter_leaf_fields(cls):
        group.add_argument(f"--{name}", dest=f"cfg:{name}", default=None, metavar=_metavar(tp),
                           help=help_ or None)


def _metavar(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return "LIST"
    if origin is dict:
        return "MAP"
    return getattr(tp, "__name__", "VALUE").upper()


def overrides_from_args(args) -> dict[str, str]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}


def apply_overrides(recipe: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``recipe`` with dotted overrides applied (values parsed as YAML scalars)."""
    data = to_dict(recipe)
    for dotted, raw in overrides.items():
        value = (load_yaml(raw, f"flag --{dotted} {raw!r}",
                           fix="give a YAML value, e.g. --sweep.methods '[slm, slm-d]', or quote "
                               "a string that holds ': ', '[' or '{' (\"'a: b'\")")
                 if isinstance(raw, str) else raw)
        if isinstance(raw, str) and value is None:
            value = raw
        node = data
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"unknown recipe field '{dotted}'")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"unknown recipe field '{dotted}'")
        node[parts[-1]] = value
    return from_dict(type(recipe), data)
