from envoy.service.auth.v3 import external_auth_pb2 as _external_auth_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExplainRequest(_message.Message):
    __slots__ = ("request", "check_request", "show_claims")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHECK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    SHOW_CLAIMS_FIELD_NUMBER: _ClassVar[int]
    request: HttpRequest
    check_request: _external_auth_pb2.CheckRequest
    show_claims: bool
    def __init__(self, request: _Optional[_Union[HttpRequest, _Mapping]] = ..., check_request: _Optional[_Union[_external_auth_pb2.CheckRequest, _Mapping]] = ..., show_claims: _Optional[bool] = ...) -> None: ...

class HttpRequest(_message.Message):
    __slots__ = ("method", "host", "path", "headers", "source_ip", "context_extensions", "destination_principal", "scheme", "client_certificate")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ContextExtensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    headers: _containers.ScalarMap[str, str]
    source_ip: str
    context_extensions: _containers.ScalarMap[str, str]
    destination_principal: str
    scheme: str
    client_certificate: str
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., source_ip: _Optional[str] = ..., context_extensions: _Optional[_Mapping[str, str]] = ..., destination_principal: _Optional[str] = ..., scheme: _Optional[str] = ..., client_certificate: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("decision", "status", "reason", "policy", "provider", "principal", "request", "tokens", "policies_evaluated", "enforced_allow_policies", "policies", "audited", "dry_run", "headers_to_set", "headers_to_remove", "query_params_to_remove", "response_headers", "workload", "note")
    class DryRunEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class HeadersToSetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ResponseHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DECISION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    POLICIES_EVALUATED_FIELD_NUMBER: _ClassVar[int]
    ENFORCED_ALLOW_POLICIES_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    AUDITED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    HEADERS_TO_SET_FIELD_NUMBER: _ClassVar[int]
    HEADERS_TO_REMOVE_FIELD_NUMBER: _ClassVar[int]
    QUERY_PARAMS_TO_REMOVE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_HEADERS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    decision: str
    status: int
    reason: str
    policy: str
    provider: str
    principal: str
    request: JudgedRequest
    tokens: _containers.RepeatedCompositeFieldContainer[TokenOutcome]
    policies_evaluated: bool
    enforced_allow_policies: int
    policies: _containers.RepeatedCompositeFieldContainer[PolicyTrace]
    audited: _containers.RepeatedScalarFieldContainer[str]
    dry_run: _containers.ScalarMap[str, str]
    headers_to_set: _containers.ScalarMap[str, str]
    headers_to_remove: _containers.RepeatedScalarFieldContainer[str]
    query_params_to_remove: _containers.RepeatedScalarFieldContainer[str]
    response_headers: _containers.ScalarMap[str, str]
    workload: Workload
    note: str
    def __init__(self, decision: _Optional[str] = ..., status: _Optional[int] = ..., reason: _Optional[str] = ..., policy: _Optional[str] = ..., provider: _Optional[str] = ..., principal: _Optional[str] = ..., request: _Optional[_Union[JudgedRequest, _Mapping]] = ..., tokens: _Optional[_Iterable[_Union[TokenOutcome, _Mapping]]] = ..., policies_evaluated: _Optional[bool] = ..., enforced_allow_policies: _Optional[int] = ..., policies: _Optional[_Iterable[_Union[PolicyTrace, _Mapping]]] = ..., audited: _Optional[_Iterable[str]] = ..., dry_run: _Optional[_Mapping[str, str]] = ..., headers_to_set: _Optional[_Mapping[str, str]] = ..., headers_to_remove: _Optional[_Iterable[str]] = ..., query_params_to_remove: _Optional[_Iterable[str]] = ..., response_headers: _Optional[_Mapping[str, str]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("name", "unknown", "policies_in_scope", "providers_in_scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    POLICIES_IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_IN_SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    unknown: str
    policies_in_scope: _containers.RepeatedScalarFieldContainer[str]
    providers_in_scope: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., unknown: _Optional[str] = ..., policies_in_scope: _Optional[_Iterable[str]] = ..., providers_in_scope: _Optional[_Iterable[str]] = ...) -> None: ...

class JudgedRequest(_message.Message):
    __slots__ = ("method", "host", "path")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class TokenOutcome(_message.Message):
    __slots__ = ("location", "providers", "result", "provider", "principal", "error", "description", "claims", "details", "credential")
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    location: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    result: str
    provider: str
    principal: str
    error: str
    description: str
    claims: _struct_pb2.Struct
    details: _containers.RepeatedScalarFieldContainer[str]
    credential: str
    def __init__(self, location: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., result: _Optional[str] = ..., provider: _Optional[str] = ..., principal: _Optional[str] = ..., error: _Optional[str] = ..., description: _Optional[str] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., details: _Optional[_Iterable[str]] = ..., credential: _Optional[str] = ...) -> None: ...

class PolicyTrace(_message.Message):
    __slots__ = ("name", "action", "dry_run", "matched", "decided", "rules")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    name: str
    action: str
    dry_run: bool
    matched: bool
    decided: bool
    rules: _containers.RepeatedCompositeFieldContainer[RuleTrace]
    def __init__(self, name: _Optional[str] = ..., action: _Optional[str] = ..., dry_run: _Optional[bool] = ..., matched: _Optional[bool] = ..., decided: _Optional[bool] = ..., rules: _Optional[_Iterable[_Union[RuleTrace, _Mapping]]] = ...) -> None: ...

class RuleTrace(_message.Message):
    __slots__ = ("rule", "matched", "failed")
    RULE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    rule: int
    matched: bool
    failed: _containers.RepeatedCompositeFieldContainer[FailedClause]
    def __init__(self, rule: _Optional[int] = ..., matched: _Optional[bool] = ..., failed: _Optional[_Iterable[_Union[FailedClause, _Mapping]]] = ...) -> None: ...

class FailedClause(_message.Message):
    __slots__ = ("field", "wanted", "had", "hidden", "unknown")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    HAD_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    field: str
    wanted: _containers.RepeatedScalarFieldContainer[str]
    had: _struct_pb2.Value
    hidden: bool
    unknown: str
    def __init__(self, field: _Optional[str] = ..., wanted: _Optional[_Iterable[str]] = ..., had: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., hidden: _Optional[bool] = ..., unknown: _Optional[str] = ...) -> None: ...
