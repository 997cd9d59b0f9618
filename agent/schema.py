"""JSON Schema (2020-12) of every payload kind, generated from ``agent.payloads``.

The files under ``docs/schema/`` are this module's output, for people writing
subscribers in other languages; a test keeps them equal to it and validates
real messages against them. Regenerate with ``python -m agent.schema docs/schema``.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Literal

from agent.payloads import PAYLOADS, SCHEMA, Payload, _wire_names

DIALECT = "https://json-schema.org/draft/2020-12/schema"
_TIMES = {"at", "since", "changed_at", "started_at"}


def _type(hint: object) -> dict[str, object]:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return {"enum": list(typing.get_args(hint))}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [_type(arm) for arm in typing.get_args(hint)]}
    names = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
    if hint in names:
        return {"type": names[hint]}
    raise TypeError(f"no JSON Schema for {hint!r}")  # pragma: no cover


def schema_of(cls: type[Payload]) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, object] = {
        "schema": {"type": "integer", "minimum": 1, "maximum": SCHEMA},
        "kind": {"const": cls.KIND},
    }
    for key, name in _wire_names(cls):
        prop = _type(hints[name])
        if key in _TIMES:
            prop["format"] = "date-time"
        properties[key] = prop
    doc = (cls.__doc__ or "").strip().splitlines()[0]
    return {
        "$schema": DIALECT,
        "$id": f"https://vcpu-agent.invalid/schema/{SCHEMA}/{cls.KIND}.json",
        "title": f"vcpu-agent {cls.KIND} (schema {SCHEMA})",
        "description": doc,
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": True,  # fields may be added within a schema version
    }


def render(cls: type[Payload]) -> str:
    return json.dumps(schema_of(cls), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/schema")
    out.mkdir(parents=True, exist_ok=True)
    for kind, cls in PAYLOADS.items():
        (out / f"{kind}.json").write_text(render(cls))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
