"""The gRPC door writes dynamic metadata itself: the message Envoy reads must be the one
protobuf's ``Struct.update`` makes, for every value a token's claims can hold."""

from __future__ import annotations

from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_server.doors import struct_wire
from authz_server.doors.grpc import _metadata_field

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _with_protobuf(fields: dict[str, Any]) -> bytes:
    struct = struct_pb2.Struct()
    struct.update(fields)
    return struct.SerializeToString()  # type: ignore[no-any-return]


@given(st.dictionaries(st.text(max_size=8), _JSON, max_size=6))
@settings(max_examples=300, deadline=None)
def test_written_metadata_is_the_struct_protobuf_makes(fields: dict[str, Any]) -> None:
    written = struct_pb2.Struct.FromString(struct_wire.struct_body(fields))
    assert written == struct_pb2.Struct.FromString(_with_protobuf(fields))


def test_each_caller_gets_their_own_values_back() -> None:
    alice = {"principal": "iss/alice", "claims": {"sub": "alice", "groups": ["dev"]}}
    bob = {"principal": "iss/bob", "claims": {"sub": "bob", "groups": ["ops"], "n": 1}}
    for fields in (alice, bob, alice):
        assert struct_pb2.Struct.FromString(struct_wire.struct_body(fields)) == (
            struct_pb2.Struct.FromString(_with_protobuf(fields))
        )


def test_values_a_struct_cannot_hold_are_refused_as_protobuf_refuses_them() -> None:
    class Weird:
        pass

    for bad in ({"a": Weird()}, {"a": 10**400}, {"a": "\ud800"}):
        try:
            _with_protobuf(bad)
        except Exception as exc:
            expected: type[Exception] = type(exc)
        else:  # pragma: no cover - protobuf took it
            raise AssertionError(f"protobuf encoded {bad!r}")
        try:
            _metadata_field(bad)
        except Exception as exc:
            assert type(exc) is expected
        else:
            raise AssertionError(f"{bad!r} was encoded")


def test_what_is_left_to_protobuf_is_encoded_by_it() -> None:
    deep: dict[str, Any] = {"leaf": "x"}
    for _ in range(struct_wire.MAX_DEPTH + 2):
        deep = {"d": deep}
    odd = {"tuple": ("a", 1), "deep": deep, "flag": True}
    sent = external_auth_pb2.CheckResponse.FromString(_metadata_field(odd)).dynamic_metadata
    assert sent == struct_pb2.Struct.FromString(_with_protobuf(odd))
