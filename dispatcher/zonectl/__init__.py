"""`dispatcher zones`: the operator's CLI process that lists zone actors and moves them between nodes."""
