"""A small JSON-schema subset: validation of model outputs and extraction of the JSON text.

The `jsonschema` package is not a dependency; model outputs only need the subset our prompts use
(objects with required keys, strings, numbers, integers, booleans, null, enums, arrays with item schemas
and size bounds, string length bounds, numeric bounds). Anything else in a schema is ignored here, and
`check_supported` says so up front for the constrained decoder, which must understand every keyword.

>>> validate({"a": "x"}, {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}})
[]
>>> validate({}, {"type": "object", "required": ["a"]})
['$: missing required key "a"']
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)

# Keywords the validator and the constrained decoder understand (others would be silently ignored).
SUPPORTED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "items",
        "enum",
        "const",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "additionalProperties",
        "title",
        "description",
        "$schema",
        "default",
    }
)


def _type_ok(value: Any, typ: str) -> bool:
    if typ == "object":
        return isinstance(value, dict)
    if typ == "array":
        return isinstance(value, list)
    if typ == "string":
        return isinstance(value, str)
    if typ == "boolean":
        return isinstance(value, bool)
    if typ == "null":
        return value is None
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True  # unknown type names are not ours to judge


def _check_bounds(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    errors = []
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than maxLength {schema['maxLength']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: {len(value)} items, minItems is {schema['minItems']}")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{path}: {len(value)} items, maxItems is {schema['maxItems']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} > maximum {schema['maximum']}")
    return errors


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Validate a decoded JSON value against the supported schema subset.

    Args:
        value: Decoded JSON.
        schema: The schema.
        path: Location prefix for messages.

    Returns:
        Problems as "path: message" strings; empty when valid.
    """
    typ = schema.get("type")
    types = typ if isinstance(typ, list) else [typ] if typ else []
    if types and not any(_type_ok(value, t) for t in types):
        return [f"{path}: expected {'|'.join(types)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if "const" in schema and value != schema["const"]:
        return [f"{path}: expected {schema['const']!r}"]
    errors = _check_bounds(value, schema, path)
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f'{path}: missing required key "{key}"')
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors.extend(validate(value[key], sub, f"{path}.{key}"))
        if schema.get("additionalProperties") is False:
            extra = sorted(set(value) - set(schema.get("properties", {})))
            if extra:
                errors.append(f"{path}: unexpected keys {extra}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
    return errors


def extract_json_text(text: str) -> str:
    """Strip a Markdown code fence and surrounding whitespace from a model's JSON answer.

    Args:
        text: Raw model output.

    Returns:
        The text that should parse as JSON.
    """
    match = _FENCE.match(text)
    return (match.group(1) if match else text).strip()


def parse_and_validate(text: str, schema: dict[str, Any]) -> tuple[str, str | None]:
    """Parse a model output as one JSON value and validate it.

    Args:
        text: Raw model output.
        schema: The requested schema.

    Returns:
        (cleaned JSON text, None) when valid, else (cleaned text, one-line problem).
    """
    clean = extract_json_text(text)
    try:
        value = json.loads(clean)
    except json.JSONDecodeError as exc:
        return clean, f"output is not JSON ({exc.msg} at char {exc.pos})"
    problems = validate(value, schema)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return clean, f"output fails schema: {problems[0]}{more}"
    return clean, None


def schema_instruction(schema: dict[str, Any]) -> str:
    """The prompt line that asks for JSON matching `schema` (servers/models that cannot enforce it)."""
    return (
        "Reply with exactly one JSON object and nothing else, matching this JSON schema: "
        + json.dumps(schema, separators=(",", ":"))
    )


def check_supported(schema: dict[str, Any], path: str = "$") -> None:
    """Raise when a schema uses keywords outside the supported subset.

    Args:
        schema: The schema.
        path: Location prefix for messages.

    Raises:
        ValueError: Naming the keyword and where it is.
    """
    unknown = sorted(set(schema) - SUPPORTED_KEYWORDS)
    if unknown:
        raise ValueError(
            f"json_schema at {path} uses unsupported keywords {unknown}; "
            f"supported: {sorted(SUPPORTED_KEYWORDS)}"
        )
    for key, sub in schema.get("properties", {}).items():
        check_supported(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        check_supported(schema["items"], f"{path}[]")
