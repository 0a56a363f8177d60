"""YAML -> dataclasses, strictly: `extends:` chains, dotted overrides, types, ranges, did-you-mean.

The schema itself (which sections and keys a recipe has) is `toolkit.core.schema`, checked
across sections by `toolkit.runs.recipe`; this module is the machinery, and knows no key by
name. Every error is a `RecipeError` whose one line names the file (or override) that set the
key, the dotted key, and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(Exception):
    """A user error in a recipe or override: one line naming the file, the key and the problem."""


def setting(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    """A scalar schema field; `rules` hold its checks (gt, ge, lt, choices) and its YAML key."""
    return field(default=default, metadata=rules)


class Origins:
    """Remembers which file (or override) set each dotted key, so errors can name it."""

    def __init__(self, default: str) -> None:
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, data: Any, origin: str, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            return
        for key, value in data.items():
            dotted = f"{prefix}{key}"
            self.by_key[dotted] = origin
            self.record(value, origin, dotted + ".")

    def of(self, dotted: str) -> str:
        key = dotted
        while key:
            if key in self.by_key:
                return self.by_key[key]
            key = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key) if re.search(r"[.\[]", key) else ""
        return self.default

    def fail(self, dotted: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{self.of(dotted)}: {dotted}: {message}")


# --- reading files -------------------------------------------------------------------------------


def read_yaml(
    path: Path, what: str = "recipe", expected: str = "a mapping of recipe keys"
) -> dict[str, Any]:
    """A YAML file that must hold a mapping, read strictly: UTF-8 only, a key given twice
    refused, every problem one line naming the file (and the line, for bad YAML). Recipes and
    sweep files share it so both are read alike; `what` names the kind of file and `expected`
    the mapping it holds, in the messages."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: {what} file not found") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read {what}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        # Not a YAML problem: the file is binary or in another encoding (a UTF-16 save).
        raise RecipeError(
            f"{path}: cannot read {what}: expected UTF-8 text, got byte "
            f"0x{err.object[err.start]:02x} at offset {err.start}"
        ) from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # safe_load's loader, duplicate keys refused
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}{where}: invalid YAML: {problem}") from None
    except ValueError as err:  # a scalar YAML matched but Python cannot build: 2024-13-01
        reason = str(err).split(";")[0]  # not the advice to call sys.set_int_max_str_digits
        raise RecipeError(f"{path}: invalid YAML: {reason}") from None
    if data is None:
        raise RecipeError(f"{path}: the {what} is empty: expected {expected}")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected {expected}, got {kind(data)}")
    return data


class DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping names one key twice."""


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML
    says keys are unique, and PyYAML would silently keep the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` brings keys in that the mapping's own keys may override
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # `? [1]`: PyYAML's own message, not a TypeError from `in seen`
                raise yaml.constructor.ConstructorError(
                    None, None, "found unhashable key", key_node.start_mark
                ) from None
            if key in seen:
                raise DuplicateKey(
                    None, None,
                    f"duplicate key {key!r} (also on line {seen[key]}; YAML keys are unique)",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_with_extends(path: Path, origins: Origins, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A file merged over the files its `extends:` names (one, or a list merged in order)."""
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise RecipeError(f"{path}: extends: cycle: {cycle}")
    data = read_yaml(path)
    parents = data.pop("extends", None)
    if parents is None:
        origins.record(data, str(path))
        return data
    names = parents if isinstance(parents, list) else [parents]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise RecipeError(
            f"{path}: extends: expected a path to another recipe or a list of them, got {parents!r}"
        )
    base: dict[str, Any] = {}
    for name in names:
        parent_path = path.parent / name
        if not parent_path.is_file():
            raise RecipeError(f"{path}: extends: {parent_path} not found")
        base = merge(base, read_with_extends(parent_path, origins, (*chain, resolved)))
    origins.record(data, str(path))
    return merge(base, data)


def merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Key by key, the child wins; mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def apply_override(
    data: dict[str, Any], item: str, origins: Origins, path: Path, schema: type
) -> None:
    """`key=value` with a dotted key, the value read as YAML (text fields: as given)."""
    key, sep, raw = item.partition("=")
    where = f"{path}: override {item[:80]!r}"
    if not sep or not _OVERRIDE_KEY.match(key):
        raise RecipeError(f"{where}: expected key=value with a dotted key, e.g. optim.lr=3e-4")
    if _is_text_field(schema, key) and raw.strip() not in ("", "null", "~"):
        value: Any = raw  # YAML would turn 24:00:00 into 86400: text fields take the text as is
    else:
        try:
            value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else None
        except DuplicateKey as err:
            raise RecipeError(f"{where}: {err.problem}") from None
        except (yaml.YAMLError, ValueError):  # ValueError: 5000 digits, 2024-13-01
            value = raw  # not YAML: keep the text; the schema says whether it is acceptable
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            prefix = ".".join(parts[: i + 1])
            raise RecipeError(f"{where}: {prefix} is {kind(child)}, not a section")
        node = child
    node[parts[-1]] = value
    shown = item if len(item) <= 80 else item[:77] + "..."  # one line, even for a runaway value
    origins.by_key[key] = f"{path} (override {shown})"
    origins.record(value, f"{path} (override {shown})", key + ".")


def _is_text_field(schema: type, dotted: str) -> bool:
    cls: Any = schema
    tp: Any = None
    for part in dotted.split("."):
        fields = {yaml_key(f): f for f in dataclasses.fields(cls)} if cls else {}
        if part not in fields:
            return False
        tp = typing.get_type_hints(cls)[fields[part].name]
        cls = dataclass_of(tp)
    return tp is str or tp == (str | None)


# --- building dataclasses ------------------------------------------------------------------------


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def dataclass_of(tp: Any) -> type | None:
    for arg in (tp, *typing.get_args(tp)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def schema_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a schema knows (list items excepted), for "did you mean" across sections."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = prefix + yaml_key(f)
        paths.append(dotted)
        inner = dataclass_of(hints[f.name])
        if inner is not None and typing.get_origin(hints[f.name]) is not list:
            paths.extend(schema_paths(inner, dotted + "."))
    return paths


def build(cls: type, data: Any, origins: Origins, schema: type, prefix: str = "") -> Any:
    """The dataclass `cls` from a mapping: unknown keys, types and ranges checked key by key.
    `schema` is the root dataclass, searched for a misplaced key's right section."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "recipe"
        origins.fail(where, f"expected a mapping, got {kind(data)}")
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            hint = suggest(key, list(fields), prefix, schema_paths(schema))
            origins.fail(dotted, "unknown key" + hint)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, f in fields.items():
        dotted = f"{prefix}{key}"
        if key in data:
            values[f.name] = _convert(hints[f.name], data[key], dotted, origins, schema)
            _check_rules(f, values[f.name], dotted, origins)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            origins.fail(dotted, "missing required key")
    return cls(**values)


def suggest(
    leaf: str, known: Sequence[str], prefix: str = "", elsewhere: Sequence[str] = ()
) -> str:
    """What follows "unknown key": the nearest of the `known` keys (a typo), else a key of that
    name in another section (`elsewhere`: every dotted key; `lr` put at the top), else the list
    of known keys. One wording for every file the toolkit reads (recipes, sweep files)."""
    close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    everywhere = [p for p in elsewhere if p.rsplit(".", 1)[-1] == leaf]
    if everywhere:
        return f"; did you mean '{everywhere[0]}'?"
    return f"; expected one of: {', '.join(known)}"


def _convert(tp: Any, value: Any, dotted: str, origins: Origins, schema: type) -> Any:
    def fail(expected: str) -> typing.NoReturn:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."  # one line
        got = f"{kind(value)} {shown}" if not isinstance(value, (dict, list)) else kind(value)
        origins.fail(dotted, f"expected {expected}, got {got}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, dotted, origins, schema)
    if dataclasses.is_dataclass(tp):
        if value is None:
            fail("a mapping")
        return build(tp, value, origins, schema, dotted + ".")
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        (item_tp,) = typing.get_args(tp)
        return [
            _convert(item_tp, v, f"{dotted}[{i}]", origins, schema) for i, v in enumerate(value)
        ]
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        if not -(2**63) <= value < 2**63:  # beyond int64, torch and numpy cannot hold it
            origins.fail(dotted, f"{str(value)[:20]}... is out of range: expected an int64")
        return value
    if tp is float:
        # PyYAML reads `5e-4` (no dot) as a string; accept any text float() understands.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            fail("a number")
        try:
            number = float(value)
        except ValueError:  # "fast"
            fail("a number")
        except OverflowError:  # an integer past a float's range: too large, like 1e400
            number = math.inf
        # `1e400` reads as inf, `.nan` as nan: no setting takes one (null turns a limit off),
        # and a learning rate of inf would only show up as a NaN loss some steps later.
        if not math.isfinite(number):
            fail("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            fail("a string (quote it in YAML)")
        return value
    raise TypeError(f"schema type {tp!r} of {dotted} is not supported")  # a bug in the schema


_BOUNDS = {
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}


def _check_rules(f: dataclasses.Field, value: Any, dotted: str, origins: Origins) -> None:
    if value is None:
        return
    rules = f.metadata
    limits = [
        (op, f"{sym} {rules[name]}", rules[name])
        for name, (op, sym) in _BOUNDS.items()
        if name in rules
    ]
    if any(not op(value, bound) for op, _, bound in limits):
        wanted = " and ".join(text for _, text, _ in limits)
        origins.fail(dotted, f"{value!r} is out of range: expected {wanted}")
    if "choices" in rules and value not in rules["choices"]:
        choices = ", ".join(str(c) for c in rules["choices"])
        origins.fail(dotted, f"{value!r} is not one of: {choices}")


# --- plain data ----------------------------------------------------------------------------------


def to_plain(value: Any) -> Any:
    """A dataclass tree as plain dicts and lists, with the YAML key names."""
    if dataclasses.is_dataclass(value):
        return {yaml_key(f): to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    names.update({int: "an integer", float: "a number", type(None): "null"})
    return names.get(type(value), type(value).__name__)
