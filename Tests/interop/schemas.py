"""Validates frames and REST bodies against the JSON Schemas in protocol/schemas."""
import json
import pathlib

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = pathlib.Path(__file__).resolve().parents[2] / "protocol" / "schemas"

# Schemas refer to each other by relative `$ref` (a delivery holds a rest/message); resolve them
# from the files, never from the network.
_ALL = [json.loads(p.read_text()) for p in sorted(SCHEMAS.rglob("*.schema.json"))]
_REGISTRY = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in _ALL)


def _load(path):
    schema = json.loads(path.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_REGISTRY)


FRAMES = {p.name.removesuffix(".schema.json"): _load(p) for p in SCHEMAS.glob("*.schema.json")}
REST = {p.name.removesuffix(".schema.json"): _load(p) for p in (SCHEMAS / "rest").glob("*.schema.json")}


def validate_frame(frame):
    """Raises if `frame` does not match the schema of its type; returns the frame."""
    validator = FRAMES.get(frame.get("type"))
    assert validator is not None, f"no schema for frame type {frame.get('type')!r}"
    validator.validate(frame)
    return frame


def validate_rest(name, body):
    REST[name].validate(body)
    return body
