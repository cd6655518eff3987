"""`python -m benchmarks`: the load benchmark of the service against its own servers and references."""
