"""docs/operational-events.md documents every operational event type with an example that its
published JSON Schema (docs/schemas/) accepts, and every schema is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from tests import support

DOCS = support.ROOT / "docs"
SCHEMAS = DOCS / "schemas"
_JSON_BLOCK = re.compile(r"^```json\n(.*?)^```", re.M | re.S)


def _examples() -> list[dict[str, object]]:
    text = (DOCS / "operational-events.md").read_text(encoding="utf-8")
    return [json.loads(block) for block in _JSON_BLOCK.findall(text)]


def _schema(path: Path) -> dict[str, object]:
    schema = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return dict(schema)


def test_every_example_is_valid_and_every_schema_has_one() -> None:
    examples = _examples()
    types = sorted(str(e["type"]) for e in examples)
    schemas = sorted(p.name.removesuffix(".json") for p in SCHEMAS.glob("*.json"))
    assert types == schemas
    for example in examples:
        schema = _schema(SCHEMAS / f"{example['type']}.json")
        jsonschema.validate(example, schema, format_checker=jsonschema.FormatChecker())


def test_the_schemas_refuse_a_payload_field() -> None:
    # Nothing beyond the documented fields can slip into an event (a payload, a secret).
    [example] = [e for e in _examples() if e["type"] == "dispatcher.delivery.dead"]
    data = dict(example["data"])  # type: ignore[call-overload]
    leaked = {**example, "data": {**data, "payload": {"card": "4111"}}}
    schema = _schema(SCHEMAS / "dispatcher.delivery.dead.json")
    with pytest.raises(jsonschema.ValidationError, match="payload"):
        jsonschema.validate(leaked, schema)
