"""Policies: Istio-semantics rules compiled at load and evaluated per request (``compile``), the
rule index that narrows the rules a request can match (``index``), and which policies apply to
which workload (``workloads``, scoping)."""
