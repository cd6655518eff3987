"""Offers: drivers accept their jobs (cascade and wave modes); the pure rules and the wire bodies."""
