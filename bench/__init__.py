"""The benchmark of authz-server: one tool, ``make bench`` (``python -m bench``).

- ``harness/``: what every measurement stands on. Processes pinned to CPUs, measured from
  /proc and stopped by PID (``procs``); authz-server as its own process (``servers``); HTTP
  endpoints served from this process, such as an IdP's (``endpoints``); the load generators
  wrk and h2load (``loadgen``); Envoy bootstraps derived from the shipped one
  (``envoy_bootstrap``); scenarios and interleaved rounds (``rounds``); in-process timing and
  a realistic configuration (``inprocess``); the floors, the least a gRPC or HTTP server can
  do (``floor_server.py``, ``http_floor.py``, run as their own processes).
- ``scenarios/``: what is measured. ``envoy`` (through one Envoy core and direct gRPC, the
  body of ``make bench``) with its configuration (``reference``); sections of the report that
  run after it (``scoping``, ``tracing``); and scenarios run on their own with
  ``python -m bench.scenarios.NAME`` (``check_loop``, ``credentials``, ``dpop``,
  ``decision_log``, ``observability``, ``memory``, ``policy_scale``).
- ``report``: bench/results/latest.md.
- ``soak/``: ``make soak``, sustained load with changes under it.

Lower layers never import upper ones: harness imports nothing of scenarios or report;
scenarios import harness; ``__main__`` and ``report`` sit on top.
"""
