"""Runs inside Ray zone actors only: the actor shell, its options, ZoneCore and its lock."""
