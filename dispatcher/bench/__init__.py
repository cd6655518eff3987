"""`python -m dispatcher.bench`: the load benchmark of issue 4 against its own servers and references."""
