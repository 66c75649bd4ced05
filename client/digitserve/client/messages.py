"""Protobuf messages as JSON values, for ``--json`` and the library's dict forms: every field by
its proto name (defaults included), repeated fields as lists, maps as objects, nested messages as
objects, enums by name, and int64 as numbers (protobuf's own JSON mapping writes them as strings,
and camelCases the names unless told otherwise)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return message_dict(value)
    if field.enum_type is not None:
        number = int(value)
        known = field.enum_type.values_by_number.get(number)
        return number if known is None else known.name  # a value newer than this client: its number
    return value


def message_dict(message: Message) -> dict[str, Any]:
    """``message`` as a dict of JSON values, its fields in declaration order."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            entry = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(entry, value[key]) for key in sorted(value)}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out
