"""``google.protobuf.Struct`` on the wire, written straight from a JSON-like mapping.

The gRPC door sends each new token's claims as Envoy dynamic metadata. ``Struct.update``
costs ~10 us for a typical token (Python code per field and value); most of those fields come
back unchanged in the caller's next token (issuer, subject, audience, groups, email), only a
few change (``jti``, ``exp``, ``iat``). So the bytes of each map entry with a string value are
kept, keyed by the name and the value themselves (the same pair is the same bytes, whoever
sent it), and an answer is mostly joined from them.

Only what ``Struct.update`` turns into the same message is written here: None, bool, int and
float (as a double), str, and dicts and lists of those, ``MAX_DEPTH`` deep at most. Anything
else raises ``UnsupportedValueError`` and the caller builds the message with protobuf, which then
encodes it or raises what it always raised.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

# Deeper than this: protobuf's own path (whatever it does there stays what happens).
MAX_DEPTH = 16
# Entries kept (name + string value, each at most ENTRY_TEXT_KEPT characters); past this,
# start over: the callers of the moment come back at once.
ENTRIES_KEPT = 8192
ENTRY_TEXT_KEPT = 256

_DOUBLE = struct.Struct("<d").pack
_NULL = b"\x08\x00"  # Value.null_value (field 1, varint) = NULL_VALUE
_TRUE = b"\x20\x01"  # Value.bool_value (field 4, varint)
_FALSE = b"\x20\x00"
_NUMBER = b"\x11"  # Value.number_value (field 2, 64-bit)
_STRING = b"\x1a"  # Value.string_value (field 3, length-delimited)
_STRUCT = b"\x2a"  # Value.struct_value (field 5, length-delimited)
_LIST = b"\x32"  # Value.list_value (field 6, length-delimited)
_FIRST = b"\x0a"  # field 1, length-delimited: Struct.fields entries, ListValue.values, entry key
_ENTRY_VALUE = b"\x12"  # field 2, length-delimited: a map entry's value
_SHORT = tuple(bytes((n,)) for n in range(0x80))  # lengths under 128: one byte

_entries: dict[tuple[str, str], bytes] = {}


class UnsupportedValueError(Exception):
    """A value this module does not write (protobuf's Struct decides what to do with it)."""


def varint(number: int) -> bytes:
    """``number`` (>= 0) as a protobuf varint."""
    if number < 0x80:
        return _SHORT[number]
    out = bytearray()
    while number >= 0x80:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _value(value: Any, depth: int) -> bytes:
    """A ``google.protobuf.Value``'s bytes. Raises UnsupportedValueError, and OverflowError
    (an int no double holds) or UnicodeEncodeError (a lone surrogate) as protobuf does."""
    kind = type(value)
    if kind is str:
        text: bytes = value.encode("utf-8")
        return _STRING + varint(len(text)) + text
    if value is None:
        return _NULL
    if value is True:
        return _TRUE
    if value is False:
        return _FALSE
    if kind is int or kind is float:
        return _NUMBER + _DOUBLE(float(value))
    if kind is dict:
        body = struct_body(value, depth + 1)
        return _STRUCT + varint(len(body)) + body
    if kind is list:
        if depth >= MAX_DEPTH:
            raise UnsupportedValueError("nested too deep")
        items: list[bytes] = []
        for item in value:
            encoded = _value(item, depth + 1)
            items.append(_FIRST + varint(len(encoded)) + encoded)
        body = b"".join(items)
        return _LIST + varint(len(body)) + body
    # Subclasses, tuples, other mappings, other types: protobuf's own reading of them.
    raise UnsupportedValueError(kind.__name__)


def _entry(name: str, value: Any, depth: int) -> bytes:
    """One ``Struct.fields`` map entry, as the Struct's field 1."""
    key = name.encode("utf-8")
    encoded = _value(value, depth)
    entry = _FIRST + varint(len(key)) + key + _ENTRY_VALUE + varint(len(encoded)) + encoded
    return _FIRST + varint(len(entry)) + entry


def struct_body(fields: Mapping[str, Any], depth: int = 0) -> bytes:
    """The bytes of a ``google.protobuf.Struct`` holding ``fields`` (the message
    ``Struct.update(fields)`` makes). Raises UnsupportedValueError (see the module), OverflowError,
    UnicodeEncodeError."""
    if depth >= MAX_DEPTH:
        raise UnsupportedValueError("nested too deep")
    out: list[bytes] = []
    for name, value in fields.items():
        if type(name) is not str:
            raise UnsupportedValueError("a name that is not a string")
        if type(value) is str:
            pair = (name, value)
            entry = _entries.get(pair)
            if entry is None:
                entry = _entry(name, value, depth)
                if len(name) <= ENTRY_TEXT_KEPT and len(value) <= ENTRY_TEXT_KEPT:
                    if len(_entries) >= ENTRIES_KEPT:
                        _entries.clear()
                    _entries[pair] = entry
            out.append(entry)
        else:
            out.append(_entry(name, value, depth))
    return b"".join(out)
