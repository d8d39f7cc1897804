"""What is measured: each module builds its processes or in-process variants on bench.harness."""
