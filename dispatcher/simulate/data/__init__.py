"""Package data of the simulator: the Manhattan demand table and its provenance (README.md)."""
