"""Embedded PostgreSQL and Redis servers for laptops and tests (real processes, loopback ports)."""

from dispatcher.embedded.postgres_server import EmbeddedPostgres
from dispatcher.embedded.process import (
    EmbeddedServerError,
    free_port,
    postgres_bin_dir,
    redis_server_bin,
)
from dispatcher.embedded.redis_server import EmbeddedRedis

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "free_port",
    "postgres_bin_dir",
    "redis_server_bin",
]
