"""OpenAI's OpenAPI schemas as validators for the tests: an answer checked against the published
spec, every violation listed (its path in the answer, what the spec wants there and where).

The schemas are vendored in `schemas.json` by `scripts/vendor-openai-spec` (its `source` names
the repository, path and commit). The spec is OpenAPI 3.1, whose schemas are JSON Schema 2020-12
but for a few OpenAPI 3.0 leftovers, adapted here as they are loaded: `nullable: true` (null
allowed besides what the schema says), `$recursiveRef` (to the component it sits in), and
`discriminator` (dropped: a union is checked by trying its branches).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]

SCHEMAS_FILE = Path(__file__).with_name("schemas.json")
PREFIX = "#/components/schemas/"
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
SCHEMA_ONE = {"items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
              "unevaluatedItems", "unevaluatedProperties", "additionalItems"}  # fmt: skip
SCHEMA_LIST = {"allOf", "anyOf", "oneOf", "prefixItems"}
MAX_MESSAGE = 300
CHECKS = [0]  # how many instances were validated (each stream event counts)


def adapt(schema: Any, component: str) -> Any:
    """One schema of component `component` as JSON Schema 2020-12 (see the module's doc)."""
    if isinstance(schema, list):
        return [adapt(s, component) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: adapt(sub, component) for name, sub in value.items()}
        elif key in SCHEMA_ONE:
            out[key] = adapt(value, component)
        elif key in SCHEMA_LIST and isinstance(value, list):
            out[key] = [adapt(sub, component) for sub in value]
        elif key == "$recursiveRef":
            assert value == "#", f"{component}: unsupported $recursiveRef {value!r}"
            out["$ref"] = PREFIX + component
        elif key in ("$recursiveAnchor", "discriminator", "nullable"):
            continue
        else:
            out[key] = value
    if schema.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def document() -> dict[str, Any]:
    """The vendored file, its schemas adapted."""
    raw = json.loads(SCHEMAS_FILE.read_text())
    schemas = {name: adapt(schema, name) for name, schema in raw["components"]["schemas"].items()}
    return {"source": raw["source"], "components": {"schemas": schemas}}


def source() -> str:
    """Where the schemas come from, in a line."""
    s = document()["source"]
    return f"{s['repository']} {s['path']} @ {s['commit']} ({s['branch']}, OpenAPI {s['openapi']})"


@functools.cache
def validator(schema_name: str) -> Any:
    schemas = document()["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"{schema_name!r} is not vendored (scripts/vendor-openai-spec's ROOTS)")
    root = {"$ref": PREFIX + schema_name, "components": document()["components"]}
    cls = jsonschema.Draft202012Validator
    return cls(root, format_checker=cls.FORMAT_CHECKER)


def validate(schema_name: str, instance: object) -> list[str]:
    """Every way `instance` breaks the spec's `schema_name`: "<path>: <message> [spec: <where>]"."""
    CHECKS[0] += 1
    errors = sorted(validator(schema_name).iter_errors(instance), key=lambda e: _path(e.absolute_path))
    return [line for error in errors for line in _lines(error, schema_name)]


def events(raw: bytes) -> list[str]:
    """A server-sent event stream's `data` fields, in order (`[DONE]` included)."""
    out = []
    text = raw.decode().replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            out.append("\n".join(data))
    return out


def validate_stream(schema_name: str, raw: bytes) -> list[str]:
    """Every event of an SSE stream (but `data: [DONE]`) validated against `schema_name`; the
    violations prefixed with the event's number."""
    out = []
    for i, data in enumerate(events(raw)):
        if data == "[DONE]":
            continue
        try:
            instance = json.loads(data)
        except json.JSONDecodeError as err:
            out.append(f"event {i}: not JSON ({err}): {data[:100]!r}")
            continue
        out += [f"event {i}: {line}" for line in validate(schema_name, instance)]
    return out


def undeclared(schema_name: str, instance: object) -> list[str]:
    """The paths of the fields `instance` has that the spec's `schema_name` does not declare (the
    spec allows them: its objects are open), where the schema declares its object's fields."""
    return list(_undeclared(document()["components"]["schemas"][schema_name], instance, "$"))


def _undeclared(schema: Any, instance: object, path: str) -> Iterator[str]:
    if not isinstance(schema, dict):
        return
    if "$ref" in schema:
        yield from _undeclared(_resolve(schema["$ref"]), instance, path)
    for key in ("anyOf", "oneOf"):
        if key in schema:  # the first branch the instance satisfies, else the first of its kind
            branches = schema[key]
            valid = (b for b in branches if jsonschema.Draft202012Validator({**b, **document()}).is_valid(instance))
            kind = (b for b in branches if _kind(_deref(b)) == _kind(instance))
            branch = next(valid, None) or next(kind, None)
            if branch is not None:
                yield from _undeclared(branch, instance, path)
    declared: set[str] = set()
    for branch in [schema, *(_deref(b) for b in schema.get("allOf", []))]:
        declared |= set(branch.get("properties", {}))
    if isinstance(instance, dict):
        for sub in [schema, *(_deref(b) for b in schema.get("allOf", []))]:
            for name, value in instance.items():
                if name in sub.get("properties", {}):
                    yield from _undeclared(sub["properties"][name], value, f"{path}.{name}")
        extra = schema.get("additionalProperties")
        if declared and extra is None:
            yield from (f"{path}.{name}" for name in instance if name not in declared)
        elif isinstance(extra, dict):
            for name, value in instance.items():
                if name not in declared:
                    yield from _undeclared(extra, value, f"{path}.{name}")
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(instance):
            yield from _undeclared(schema["items"], item, f"{path}[{i}]")


def _kind(schema_or_instance: Any) -> str:
    """The kind ("object", "array" or "other") of a schema, by its keywords, or of an instance."""
    x = schema_or_instance
    if isinstance(x, dict) and ("properties" in x or x.get("type") == "object"):
        return "object"
    if isinstance(x, dict) and ("items" in x or x.get("type") == "array"):
        return "array"
    return "object" if isinstance(x, dict) else "array" if isinstance(x, list) else "other"


def _resolve(ref: str) -> Any:
    return document()["components"]["schemas"][ref.removeprefix(PREFIX)]


def _deref(schema: Any) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        schema = _resolve(schema["$ref"])
    return schema


def _path(parts: Any) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _where(error: Any, schema_name: str) -> str:
    """Where in the spec the failed keyword is: component name, then the path within it."""
    here: list[str] = []
    node: Any = validator(schema_name).schema
    for part in error.absolute_schema_path:  # jsonschema's paths go through `$ref` without naming it
        while isinstance(node, dict) and part not in node and "$ref" in node:
            here = [node["$ref"].removeprefix(PREFIX)]
            node = _resolve(node["$ref"])
        node = node[part] if isinstance(node, (dict, list)) else None
        here.append(str(part))
    return "/".join(here)


def _lines(error: Any, schema_name: str) -> list[str]:
    """An error as lines; a failed union (anyOf / oneOf) as the errors of the branch the instance
    was most likely meant for."""
    if error.validator in ("anyOf", "oneOf") and error.context:
        by_branch: dict[int, list[Any]] = {}
        for sub in error.context:
            by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
        depth = len(error.absolute_path)
        best = min(by_branch.values(), key=lambda errs: (_other_kind(errs, depth), len(errs)))
        return [line for sub in sorted(best, key=lambda e: _path(e.absolute_path)) for line in _lines(sub, schema_name)]
    message = error.message if len(error.message) <= MAX_MESSAGE else error.message[:MAX_MESSAGE] + "…"
    return [f"{_path(error.absolute_path)}: {message} [spec: {_where(error, schema_name)}]"]


def _other_kind(errors: list[Any], depth: int) -> bool:
    """The branch is for another kind of value: the instance is not even its type, or its `type`
    / `object` tag is another."""
    for e in errors:
        at = len(e.absolute_path)
        if at == depth and e.validator == "type":
            return True
        if at == depth + 1 and e.absolute_path[-1] in ("type", "object") and e.validator in ("enum", "const"):
            return True
    return False
