"""Storage: PostgreSQL truth, Redis GEO mirror, migrations."""
