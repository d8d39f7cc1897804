"""doors/envoy_headers: the connection's attributes read back from the headers Envoy adds to
the HTTP door's requests, and what stays unknown (fails closed) when they are not Envoy's."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from authz_server.attributes import (
    CONNECTION_SNI,
    CONTEXT_EXTENSIONS,
    DESTINATION_IP,
    DESTINATION_PORT,
    SOURCE_IP,
    SOURCE_PRINCIPAL,
)
from authz_server.config import load as config
from authz_server.doors.envoy_headers import (
    ATTRIBUTE_HEADERS,
    door_unknown,
    read_attribute_headers,
)
from authz_server.errors import ConfigError
from tests.helpers import write_config

# What Envoy sends for an mTLS client (its formatters in quotes).
FROM_ENVOY = {
    "x-authz-source-ip": '"203.0.113.7"',
    "x-authz-peer-principal": '"spiffe://cluster.local/ns/shop/sa/orders"',
    "x-authz-destination-ip": '"10.0.0.5"',
    "x-authz-destination-port": '"8443"',
    "x-authz-sni": '"api.example.com"',
}


def test_every_attribute_envoy_sends_is_known_and_only_context_extensions_stay_unknown() -> None:
    read = read_attribute_headers(FROM_ENVOY)
    assert read.source_ip == "203.0.113.7"
    assert read.peer_principal == "spiffe://cluster.local/ns/shop/sa/orders"
    assert read.destination_ip == "10.0.0.5"
    assert read.destination_port == 8443
    assert read.sni == "api.example.com"
    assert read.unknown == frozenset({CONTEXT_EXTENSIONS})


def test_no_peer_certificate_and_no_sni_are_known_to_be_absent() -> None:
    read = read_attribute_headers(
        {**FROM_ENVOY, "x-authz-peer-principal": '""', "x-authz-sni": '""'}
    )
    assert (read.peer_principal, read.sni) == ("", "")
    assert read.unknown == frozenset({CONTEXT_EXTENSIONS})


def test_a_peer_with_several_uri_sans_is_known_by_the_first() -> None:
    read = read_attribute_headers(
        {**FROM_ENVOY, "x-authz-peer-principal": '"spiffe://td/ns/a/sa/b,spiffe://td/ns/c/sa/d"'}
    )
    assert read.peer_principal == "spiffe://td/ns/a/sa/b"


@pytest.mark.parametrize(
    ("header", "value", "attribute"),
    [
        ("x-authz-source-ip", None, SOURCE_IP),  # Envoy not configured to send it
        ("x-authz-source-ip", "203.0.113.7", SOURCE_IP),  # not quoted: not Envoy's value
        ("x-authz-source-ip", '"203.0.113.7","10.0.0.1"', SOURCE_IP),  # two copies joined
        ("x-authz-source-ip", '"/run/envoy.sock"', SOURCE_IP),  # a Unix socket peer
        ("x-authz-source-ip", '""', SOURCE_IP),
        ("x-authz-destination-ip", '"10.0.0"', DESTINATION_IP),
        ("x-authz-destination-port", '"0"', DESTINATION_PORT),
        ("x-authz-destination-port", '"65536"', DESTINATION_PORT),
        ("x-authz-destination-port", '"80 "', DESTINATION_PORT),
        ("x-authz-peer-principal", None, SOURCE_PRINCIPAL),
        ("x-authz-peer-principal", "spiffe://evil/x", SOURCE_PRINCIPAL),
        ("x-authz-sni", '"a"b"', CONNECTION_SNI),
        ("x-authz-sni", '"', CONNECTION_SNI),
    ],
)
def test_a_header_that_is_not_what_envoy_sends_leaves_its_attribute_unknown(
    header: str, value: str | None, attribute: str
) -> None:
    headers = dict(FROM_ENVOY)
    if value is None:
        del headers[header]
    else:
        headers[header] = value
    read = read_attribute_headers(headers)
    assert read.unknown == frozenset({CONTEXT_EXTENSIONS, attribute})


def test_envoys_values_are_its_formatters_in_quotes_so_never_empty() -> None:
    for _, _, value in ATTRIBUTE_HEADERS:
        assert value.startswith('"%') and value.endswith('%"'), value
    assert {attribute for _, attribute, _ in ATTRIBUTE_HEADERS} == door_unknown(False) - {
        CONTEXT_EXTENSIONS
    }
    assert door_unknown(True) == frozenset({CONTEXT_EXTENSIONS})


def test_the_istio_provider_in_the_reference_adds_exactly_what_the_door_reads() -> None:
    root = Path(__file__).resolve().parents[2]
    reference = (root / "docs" / "reference.md").read_text()
    section = reference.split("#### With Istio (`envoyExtAuthzHttp`)", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, re.DOTALL)
    assert block is not None
    provider = yaml.safe_load(block.group(1))["envoyExtAuthzHttp"]
    added = provider["includeAdditionalHeadersInCheck"]
    assert added == {header: value for header, _, value in ATTRIBUTE_HEADERS}
    schema_file = root / "tests" / "data" / "istio-ext-authz-providers.yaml"
    schema = yaml.safe_load(schema_file.read_text())
    field = schema["$defs"]["envoyExtAuthzHttp"]["properties"]["includeAdditionalHeadersInCheck"]
    jsonschema.validate(added, field)


RESERVED_CONFIG = """
apiVersion: authz-server/v1
kind: AuthzConfig
server:
  httpAuthz: {attributeHeaders: true}
providers:
  - issuer: https://idp.example.com
    jwksUri: https://idp.example.com/jwks.json
    fromHeaders: [{name: X-Authz-Peer-Principal}]
    outputClaimToHeaders: [{header: x-user, claim: sub}, {header: x-authz-source-ip, claim: ip}]
policies:
  - name: signed-in
    rules: [{from: [{source: {requestPrincipals: ["*"]}}]}]
"""


def test_a_provider_cannot_use_a_header_envoy_overwrites_with_the_connection(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as refused:
        config.load(write_config(tmp_path, RESERVED_CONFIG))
    where = sorted(problem.path for problem in refused.value.problems)
    assert where == [
        "providers[0].fromHeaders[0].name",
        "providers[0].outputClaimToHeaders[1].header",
    ]
    assert all("attributeHeaders" in problem.message for problem in refused.value.problems)
    # With the setting off the names are anyone's.
    config.load(write_config(tmp_path, RESERVED_CONFIG.replace("true", "false")))
