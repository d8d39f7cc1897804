"""Configuration: the documents' schema (``specs``), Istio resources read as configuration
(``istio``), and loading and checking a configuration into ``Settings`` (``load``)."""
