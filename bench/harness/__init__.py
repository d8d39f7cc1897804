"""What every measurement stands on: processes, load generators, Envoy bootstraps, rounds."""
