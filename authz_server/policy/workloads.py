"""Scoping: which workload a request is for, and which policies and providers apply to it.

One authz-server can guard many workloads (an Istio mesh with one CUSTOM provider, or many
Envoy routes). Without ``workloads`` in the configuration every policy applies to every
request. With them, each request is first matched to one declared workload, then decided
with only the policies and providers in that workload's scope.

Where an Istio object applies (its ``metadata.namespace`` and ``spec.selector``, as Istio
reads them):

====================================  ===============================================
policy in                             applies to
====================================  ===============================================
the root namespace, no selector       every workload (mesh-wide)
the root namespace, with a selector   the workloads of any namespace whose labels match
namespace N, no selector              every workload of N
namespace N, with a selector          the workloads of N whose labels match
``targetRefs`` (Gateway, Service)     the workloads listing that name in ``gatewayRefs``
                                      / ``serviceRefs``, in the ref's namespace
====================================  ===============================================

A native policy applies everywhere unless its ``appliesTo`` names workloads, namespaces,
hosts or context extensions. A request is recognised by, in this order: the route's
context extensions (every key/value a workload lists present; the workload listing the most
wins), the destination principal Envoy sends (an mTLS sidecar's SPIFFE ID), then, only when
the request carried neither, the host.

Everything here is plain data and pure functions; ``config.load`` resolves scopes at load time and
the service keeps a ``WorkloadIndex``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from authz_server.attributes import RequestAttributes

DEFAULT_ROOT_NAMESPACE = "istio-system"
# A destination principal with this scheme is a sidecar's mTLS identity (Istio's SPIFFE ID).
SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True)
class Workload:
    """A declared workload: who it is (name, namespace, labels) and how its requests are
    recognised (any one of context extensions, destination principals, hosts)."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    context_extensions: Mapping[str, str] = field(default_factory=dict)
    destination_principals: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    gateway_refs: tuple[str, ...] = ()
    service_refs: tuple[str, ...] = ()

    @property
    def recognisable(self) -> bool:
        return bool(self.context_extensions or self.destination_principals or self.hosts)


@dataclass(frozen=True)
class TargetRef:
    kind: str  # "Gateway" or "Service"
    name: str
    namespace: str | None = None


@dataclass(frozen=True)
class IstioScope:
    """Where an Istio object says it applies: its namespace, selector and target refs."""

    namespace: str | None
    match_labels: Mapping[str, str] | None = None  # None: no selector
    target_refs: tuple[TargetRef, ...] = ()


@dataclass(frozen=True)
class NativeScope:
    """A native policy's ``appliesTo``: the union of what each list selects."""

    workloads: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    context_extensions: Mapping[str, str] = field(default_factory=dict)


def _labels_match(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in wanted.items())


def _host_key(host: str) -> str:
    """A ``hosts`` entry as the index keys it: lower case, ``:*`` (any port) dropped, since a
    request's host is also looked up without its port."""
    host = host.lower()
    return host[:-2] if host.endswith(":*") else host


def istio_selection(
    scope: IstioScope, workloads: Sequence[Workload], root_namespace: str
) -> tuple[frozenset[str], list[tuple[str, str]]]:
    """The names of the workloads ``scope`` selects, and the problems as (field, message)."""
    problems: list[tuple[str, str]] = []
    if scope.namespace is None:
        problems.append(
            (
                "metadata.namespace",
                "required once workloads are declared: Istio scopes a policy by its namespace",
            )
        )
        return frozenset(), problems
    if scope.target_refs:
        if scope.match_labels is not None:
            problems.append(("spec.selector", "selector and targetRefs cannot both be set"))
            return frozenset(), problems
        selected: set[str] = set()
        for number, ref in enumerate(scope.target_refs):
            namespace = ref.namespace or scope.namespace
            if ref.kind not in ("Gateway", "Service"):
                problems.append(
                    (f"spec.targetRefs[{number}].kind", "only Gateway and Service are supported")
                )
                continue
            listing = "gatewayRefs" if ref.kind == "Gateway" else "serviceRefs"
            found = {
                w.name
                for w in workloads
                if w.namespace == namespace
                and ref.name in (w.gateway_refs if ref.kind == "Gateway" else w.service_refs)
            }
            if not found:
                problems.append(
                    (
                        f"spec.targetRefs[{number}]",
                        f"no declared workload in namespace {namespace!r} lists {ref.name!r} "
                        f"in its {listing}: declare which workload is the {ref.kind}",
                    )
                )
            selected |= found
        return frozenset(selected), problems
    mesh_wide = scope.namespace == root_namespace
    return (
        frozenset(
            w.name
            for w in workloads
            if (mesh_wide or w.namespace == scope.namespace)
            and (scope.match_labels is None or _labels_match(w.labels, scope.match_labels))
        ),
        problems,
    )


def native_selection(
    scope: NativeScope, workloads: Sequence[Workload]
) -> tuple[frozenset[str], list[tuple[str, str]]]:
    """The names of the workloads an ``appliesTo`` selects, and the problems."""
    problems: list[tuple[str, str]] = []
    names = {w.name for w in workloads}
    for number, name in enumerate(scope.workloads):
        if name not in names:
            problems.append((f"appliesTo.workloads[{number}]", f"no workload named {name!r}"))
    hosts = {_host_key(h) for h in scope.hosts}
    selected = {
        w.name
        for w in workloads
        if w.name in scope.workloads
        or w.namespace in scope.namespaces
        or hosts & {_host_key(h) for h in w.hosts}
        or (
            scope.context_extensions
            and _labels_match(w.context_extensions, scope.context_extensions)
        )
    }
    return frozenset(selected), problems


def workload_problems(workloads: Sequence[Workload]) -> list[tuple[int, str, str]]:
    """What makes a list of workloads unusable, as (index, field, message): duplicate names,
    a workload no request could be recognised as, two workloads recognised alike."""
    problems: list[tuple[int, str, str]] = []
    names: set[str] = set()
    owners: dict[tuple[str, object], str] = {}
    for index, workload in enumerate(workloads):
        if workload.name in names:
            problems.append((index, "name", f"duplicate workload name {workload.name!r}"))
        names.add(workload.name)
        if not workload.recognisable:
            problems.append(
                (
                    index,
                    "",
                    "no request could be recognised as this workload: give it "
                    "contextExtensions, destinationPrincipals or hosts",
                )
            )
        claims: list[tuple[str, str, object]] = (
            [
                (
                    "contextExtensions",
                    "context extensions",
                    tuple(sorted(workload.context_extensions.items())),
                )
            ]
            if workload.context_extensions
            else []
        )
        claims += [
            ("destinationPrincipals", "destination principal", _principal_key(p))
            for p in workload.destination_principals
        ]
        claims += [("hosts", "host", _host_key(h)) for h in workload.hosts]
        for field_name, what, key in claims:
            owner = owners.setdefault((what, key), workload.name)
            if owner != workload.name:
                problems.append(
                    (index, field_name, f"the same {what} as workload {owner!r}: ambiguous")
                )
    return problems


def http_door_gaps(workloads: Sequence[Workload]) -> list[str]:
    """One line per workload the HTTP door could never recognise: the door receives no
    context extensions and no destination principal, only the host."""
    return [
        f"workload {w.name!r} lists no hosts: the HTTP door receives no context extensions "
        "and no destination principal, so its requests through that door are an unknown "
        "workload (scoping.unknownWorkload)"
        for w in workloads
        if not w.hosts
    ]


def _is_service_host(host: str) -> bool:
    """Whether ``host`` (a ``hosts`` entry) is a Kubernetes Service name, as in-mesh callers
    send it to a sidecar: one label (``orders``), or a ``svc`` label after the first
    (``orders.shop.svc``, ``orders.shop.svc.cluster.local``, ``*.shop.svc.cluster.local``)."""
    name = _host_key(host)
    if name.startswith("["):  # an IPv6 address
        return False
    labels = name.partition(":")[0].split(".")
    return len(labels) == 1 or "svc" in labels[1:]


def client_chosen_scopes(workloads: Sequence[Workload]) -> list[tuple[int, str]]:
    """Where the client's Host header would pick a sidecar's scope, as (index, message).

    A sidecar receives a request whatever its Host header says, so recognising a sidecar's
    workload by host lets the client name another workload's policies. The host decides only
    where nothing else was sent (``WorkloadIndex.identify``): a plaintext request, or any
    request through the HTTP door. Warned, for each workload listing ``hosts``: when some
    workload is a sidecar (lists ``destinationPrincipals``); or when it is recognised by
    hosts alone and one of them is a Kubernetes Service name (``_is_service_host``)."""
    sidecars = [w.name for w in workloads if w.destination_principals]
    found: list[tuple[int, str]] = []
    for index, workload in enumerate(workloads):
        if not workload.hosts:
            continue
        if sidecars:
            found.append(
                (
                    index,
                    f"workload {workload.name!r} is recognised by its hosts while "
                    f"{', '.join(repr(n) for n in sidecars)} are sidecars "
                    "(destinationPrincipals): a request that reaches a sidecar without a "
                    "destination principal (plaintext, or through the HTTP door) is scoped by "
                    "its Host header, which the client chooses. Make mTLS STRICT and use "
                    "hosts only for gateways (docs/scoping.md)",
                )
            )
            continue
        if workload.context_extensions:
            continue
        service_hosts = [h for h in workload.hosts if _is_service_host(h)]
        if service_hosts:
            found.append(
                (
                    index,
                    f"workload {workload.name!r} is recognised by host {service_hosts[0]!r}, "
                    "a Kubernetes Service name: a sidecar receives a request whatever its Host "
                    "header says, so the client picks the scope by naming a workload's host. "
                    "At sidecars, recognise workloads by destinationPrincipals over the gRPC "
                    "door (docs/scoping.md)",
                )
            )
    return found


def _principal_key(principal: str) -> str:
    return principal.removeprefix("spiffe://")


class WorkloadIndex:
    """Finds the workload a request is for, with a few dictionary lookups."""

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self._by_extension: dict[tuple[str, str], list[Workload]] = {}
        self._by_principal: dict[str, Workload] = {}
        self._by_host: dict[str, Workload] = {}
        self._by_host_suffix: list[tuple[str, Workload]] = []
        # Declaration order breaks ties: two workloads listing as many context extensions,
        # both present in a request, go to the first declared (never to the request's map
        # order, which Envoy does not fix).
        self._order: dict[str, int] = {}
        for workload in workloads:
            self._order[workload.name] = len(self._order)
            if workload.context_extensions:
                # Indexed under one of its pairs; the others are checked on a hit.
                pair = min(workload.context_extensions.items())
                self._by_extension.setdefault(pair, []).append(workload)
            for principal in workload.destination_principals:
                self._by_principal[_principal_key(principal)] = workload
            for host in workload.hosts:
                key = _host_key(host)
                if key.startswith("*"):
                    self._by_host_suffix.append((key[1:], workload))
                else:
                    self._by_host[key] = workload
        for candidates in self._by_extension.values():
            candidates.sort(key=self._rank)  # the most specific first
        # The longest suffix first, as Envoy picks the most specific wildcard domain.
        self._by_host_suffix.sort(key=lambda entry: -len(entry[0]))

    def _rank(self, workload: Workload) -> tuple[int, int]:
        """Lower is preferred: more context extensions, then declared earlier."""
        return (-len(workload.context_extensions), self._order[workload.name])

    def identify(self, request: RequestAttributes) -> Workload | None:
        """The workload ``request`` is for, or None. By its context extensions, then by its
        destination principal; by its host only when neither was sent (a SPIFFE ID counts as
        sent; another principal, such as the DNS name of the certificate a TLS gateway
        served, names no workload and does not): the Host header is the client's to choose,
        so it never decides where a route or an mTLS sidecar said something (issue 20)."""
        extensions = request.context_extensions
        if extensions and self._by_extension:
            best: Workload | None = None
            for pair in extensions.items():
                for workload in self._by_extension.get(pair, ()):
                    if _labels_match(extensions, workload.context_extensions):
                        if best is None or self._rank(workload) < self._rank(best):
                            best = workload
                        break  # the rest of this list ranks lower
            if best is not None:
                return best
        principal = request.destination_principal
        if self._by_principal and principal:
            found = self._by_principal.get(_principal_key(principal))
            if found is not None:
                return found
        if extensions or principal.startswith(SPIFFE_SCHEME):
            return None
        if self._by_host or self._by_host_suffix:
            forms = request.host_forms
            for form in forms:
                found = self._by_host.get(form)
                if found is not None:
                    return found
            for suffix, workload in self._by_host_suffix:
                for form in forms:
                    if form.endswith(suffix):
                        return workload
        return None
