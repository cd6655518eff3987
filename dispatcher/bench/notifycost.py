"""What a NOTIFY costs a commit: booking-like transactions with 0, 1 and 2 NOTIFYs.

`python -m dispatcher.bench.notifycost` starts an embedded PostgreSQL (fsync on), LISTENs
on both channels as an ingress does, and runs 16 connections of one-insert transactions
for a few seconds each; every variant makes the same round trips.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg

from dispatcher.embedded import EmbeddedPostgres

CONNECTIONS = 16
DURATION_S = 8.0
REPEATS = 3


async def commits_per_s(dsn: str, notifies: int) -> float:
    pool = await asyncpg.create_pool(dsn, min_size=CONNECTIONS, max_size=CONNECTIONS)
    calls = ", ".join(f"pg_notify('chan{n}', $1)" for n in range(notifies)) or "$1"
    stop = time.monotonic() + DURATION_S
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        async with pool.acquire() as conn:
            while time.monotonic() < stop:
                async with conn.transaction():
                    await conn.execute("INSERT INTO t (w, i) VALUES ($1, $2)", w, done)
                    await conn.execute(f"SELECT {calls}", f"drv_{w} {done}")
                done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(CONNECTIONS)))
    rate = done / (time.monotonic() - started)
    await pool.close()
    return rate


async def measure(dsn: str) -> None:
    listener = await asyncpg.connect(dsn)
    await listener.execute("CREATE TABLE t (w int, i int)")
    for n in range(2):
        await listener.add_listener(f"chan{n}", lambda *_: None)
    for rep in range(REPEATS):
        rates = [await commits_per_s(dsn, n) for n in (0, 1, 2)]
        print(
            f"run {rep + 1}: "
            + ", ".join(f"{n} NOTIFY {r:,.0f} commits/s" for n, r in enumerate(rates)),
            flush=True,
        )
    await listener.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedPostgres(Path(tmp))
        server.start()
        try:
            asyncio.run(measure(server.create_database("notifycost")))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
