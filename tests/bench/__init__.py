"""Tests of the load benchmark (benchmarks/), marked `bench`: deselected by default."""
