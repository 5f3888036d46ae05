"""The JSON Schema of switchd.yaml, generated from the dataclasses of switchd/config.py.

The same fields and Keys that the parser reads give every property, its type, bounds,
default and description, so the schema cannot drift from what `switchd serve` accepts.
docs/switchd.schema.json is `switchd config-schema`'s output (a test keeps it current).
Editors validate with it; switchd itself does not (its parser says more, in its words).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from switchd.config import Key, Settings, is_required, keyed_fields

DIALECT = "https://json-schema.org/draft/2020-12/schema"

# A Key's own schema with one of these says the whole type: it replaces the generated one.
_TYPE_WORDS = ("type", "anyOf", "enum", "const")


def config_schema() -> dict[str, Any]:
    """The JSON Schema of a switchd.yaml."""
    return {
        "$schema": DIALECT,
        "title": "switchd.yaml",
        "description": "switchd's configuration: its server, GPU, scheduler and model catalog",
        **_mapping(Settings),
    }


def schema_text() -> str:
    """config_schema() as docs/switchd.schema.json holds it."""
    return json.dumps(config_schema(), indent=2) + "\n"


def _mapping(cls: type) -> dict[str, Any]:
    """A mapping of the file read as dataclass `cls`: its keys, none other."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for each, meta, hint in keyed_fields(cls):
        if meta.flat:
            properties.update(_mapping(hint)["properties"])
            continue
        name = meta.name or each.name
        if name in properties:  # `listen`: the host's Key speaks for the port too
            continue
        properties[name] = _property(each, meta, hint)
        if is_required(each):
            required.append(name)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    schema.update(getattr(cls, "FILE_RULES", {}))
    return schema


def _property(each: dataclasses.Field[Any], meta: Key, hint: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"description": meta.doc}
    if not any(word in meta.schema for word in _TYPE_WORDS):
        schema.update(_type(hint, meta))
    default = _default(each)
    if default not in (None, [], {}):  # an empty list says nothing (and `cmd` needs words)
        schema["default"] = default
    schema.update(meta.schema)
    return schema


def _type(hint: Any, meta: Key) -> dict[str, Any]:
    """What the parser's reader (config._Reader.read) accepts for a field of type `hint`."""
    if isinstance(hint, types.UnionType):  # X | None: null leaves the default
        (inner,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return _nullable(_type(inner, meta))
    if hint is bool:
        return {"type": "boolean"}
    if hint is float:
        bounds = {"minimum": meta.minimum}
        if meta.maximum is not None:
            bounds["maximum"] = meta.maximum
        return {"type": "number", **bounds}
    if hint is int:
        return {"type": "integer", "minimum": int(meta.minimum)}
    if hint in (str, Path):  # null leaves the default
        return {"type": ["string", "null"], "pattern": r"\S"}
    if isinstance(hint, type) and issubclass(hint, StrEnum):
        return {"enum": [member.value for member in hint]}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # null leaves the defaults
        return _nullable(_mapping(hint))
    if typing.get_origin(hint) is Mapping:  # names to dataclasses: the catalog
        _, value = typing.get_args(hint)
        return {"type": "object", "additionalProperties": _mapping(value)}
    raise TypeError(f"no JSON Schema for {hint!r}: give its Key a schema with a type")


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list):
        return schema if "null" in kind else {**schema, "type": [*kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _default(each: dataclasses.Field[Any]) -> Any:
    """The field's default as the file would write it; None where there is none to show."""
    if each.default_factory is not dataclasses.MISSING:
        return _as_yaml(each.default_factory())
    if each.default is dataclasses.MISSING:
        return None
    return _as_yaml(each.default)


def _as_yaml(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_as_yaml(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _as_yaml(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value):  # a section: each of its keys shows its own
        return None
    return value
