"""The command line's tools besides serving: development keys and tokens (``devkeys``,
``devtoken``), policy tests (``policy_tests``), and the Envoy bootstrap (``envoy_config``,
``cli_envoy_config``)."""
