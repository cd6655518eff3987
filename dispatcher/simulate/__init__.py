"""City simulator: plays drivers and orders against the service (live) or its decision rule (offline)."""
