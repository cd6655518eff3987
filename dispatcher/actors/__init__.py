"""Zone actors: one Ray actor per zone serializes assignment for that zone."""
