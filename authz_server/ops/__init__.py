"""Running the server: metrics, logging and the decision log (``log``), tracing, configuration
reload, worker processes, and TLS on the listeners. What they report on is handed in."""
