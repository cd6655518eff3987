"""Runtime: resolves settings by starting embedded servers and loading stored secrets."""

from __future__ import annotations

import json
import logging
import os
import secrets
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dispatcher.config import ResolvedSettings, Settings
from dispatcher.embedded import EmbeddedPostgres, EmbeddedRedis
from dispatcher.webhooks.signing import new_secret

log = logging.getLogger(__name__)

SECRETS_FILE = "secrets.json"
DATABASE_NAME = "dispatcher"


def load_or_create_secrets(data_dir: Path) -> tuple[dict[str, str], list[str]]:
    """Secrets kept in the data dir (mode 0600); returns them and the names made now."""
    path = data_dir / SECRETS_FILE
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    made = []
    for name, factory in (
        ("vendure_webhook_secret", new_secret),
        ("inbound_secret", new_secret),
        ("admin_token", lambda: "adm_" + secrets.token_urlsafe(32)),
    ):
        if name not in stored:
            stored[name] = factory()
            made.append(name)
    if made:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        # Written whole, then renamed: a crash never leaves half a secrets file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(stored, handle, indent=2)
        os.replace(tmp, path)
    return stored, made


class Runtime:
    """Owns whatever `serve` had to start; `close()` stops it in reverse order."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = ExitStack()
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        self.generated: dict[str, str] = {}

    def resolve(self) -> ResolvedSettings:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        updates: dict[str, Any] = {}
        if s.database_url is None:
            # die_with_parent: a `serve` killed with SIGKILL takes its servers along.
            self.postgres = EmbeddedPostgres(
                s.data_dir / "postgres", die_with_parent=True
            )
            self.postgres.start()
            self._stack.callback(self.postgres.stop)
            updates["database_url"] = self.postgres.create_database(DATABASE_NAME)
        if s.redis_url is None:
            self.redis = EmbeddedRedis(s.data_dir / "redis", die_with_parent=True)
            self.redis.start()
            self._stack.callback(self.redis.stop)
            updates["redis_url"] = self.redis.url
        missing = [
            n
            for n in ("vendure_webhook_secret", "inbound_secret", "admin_token")
            if getattr(s, n) is None
        ]
        if missing:
            stored, _ = load_or_create_secrets(s.data_dir)
            for name in missing:
                updates[name] = stored[name]
                self.generated[name] = stored[name]
        return ResolvedSettings.model_validate({**s.model_dump(), **updates})

    def close(self) -> None:
        self._stack.close()
