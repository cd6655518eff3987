"""Settings: every DISPATCHER_* environment variable, typed and frozen."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher.offers.policy import (
    DEFAULT_DEADLINE_S,
    DEFAULT_WAVE_SIZE,
    Mode,
    OfferRules,
)

# A stuck or unreachable PostgreSQL must fail a call, not hang it (nor hold the caller's
# transaction and its row locks): the default of every statement's timeout.
DEFAULT_PG_TIMEOUT_S = 5.0
# Vendure's retry window is days, the Standard Webhooks example schedule spans about
# three of them: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
DEFAULT_WEBHOOK_SCHEDULE_S: tuple[float, ...] = (
    0,
    5,
    300,
    1800,
    7200,
    18000,
    36000,
    50400,
    72000,
    86400,
)


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "dispatcher"


class Settings(BaseSettings):
    """Process configuration; built once in `main()` and passed down, never global."""

    model_config = SettingsConfigDict(
        env_prefix="DISPATCHER_", frozen=True, extra="ignore"
    )

    # Servers and secrets (docs/CONFIGURATION.md). `None` means "start an embedded one"
    # or "generate one".
    database_url: str | None = None
    redis_url: str | None = None
    ray_address: str | None = None
    data_dir: Path = Field(default_factory=default_data_dir)
    vendure_webhook_url: str | None = None
    vendure_webhook_secret: str | None = None
    inbound_secret: str | None = None
    admin_token: str | None = None
    search_radius_km: float = Field(default=5.0, gt=0, le=100)
    heartbeat_ttl_s: float = Field(default=60.0, gt=0)

    # Tuning, also in docs/CONFIGURATION.md.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    ray_namespace: str = "dispatcher"
    zone_resolution: int = Field(default=5, ge=0, le=9)
    # >0: each zone actor asks for this much of the custom resource `dispatcher_zone`,
    # so a cluster's autoscaler places zones on the worker group that offers it.
    zone_resource_units: float = Field(default=0.0, ge=0)
    # A standby incarnation per zone, running on another node, takes the zone when the
    # live one's process or node dies (no new process to wait for) and makes handoffs
    # start the successor before the zone stops. Doubles the zone processes.
    zone_standby: bool = False
    # Each zone is a process: bound how many pings can conjure up.
    max_zones: int = Field(default=64, ge=1)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    reconcile_interval_s: float = Field(default=60.0, gt=0)
    # Pings are written behind: each zone's queued fixes go in one actor call at most
    # this often. It bounds PostgreSQL's staleness and the Ray calls (~1 ms of CPU each).
    ping_flush_interval_ms: float = Field(default=50.0, ge=0)
    ping_batch_max: int = Field(default=500, ge=1)
    redis_timeout_s: float = Field(default=0.25, gt=0)
    pg_timeout_s: float = Field(default=DEFAULT_PG_TIMEOUT_S, gt=0)
    pg_pool_max: int = Field(default=8, ge=1)
    actor_call_timeout_s: float = Field(default=10.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_schedule_s: tuple[float, ...] = DEFAULT_WEBHOOK_SCHEDULE_S
    webhook_poll_interval_s: float = Field(default=1.0, gt=0)
    max_ping_speed_kmh: float = Field(default=250.0, gt=0)
    # Per-driver token bucket on location pings (api/ratelimit.py): sustained rate and
    # burst. Excess pings get 429 with Retry-After. 0 in either turns the limit off.
    ping_rate_per_s: float = Field(default=10.0, ge=0, allow_inf_nan=False)
    ping_burst: int = Field(default=60, ge=0)
    log_level: str = "INFO"
    # Driver event stream (docs/EVENTS.md): events are kept this long for resumes.
    event_retention_h: float = Field(default=24.0, gt=0)
    # WebSocket ping interval; a client that does not answer is closed 1.5x this after
    # its last frame (aiohttp waits half a heartbeat for the pong).
    event_heartbeat_s: float = Field(default=10.0, gt=0)
    # How often each ingress compares its sockets' cursors with the log (lost wake-ups).
    event_catch_up_interval_s: float = Field(default=1.0, gt=0)
    event_prune_interval_s: float = Field(default=60.0, gt=0)
    # Slow clients (slowloris) must not hold connections: a request head must arrive
    # within this of its first byte, a body within the body timeout (408 either way),
    # and an idle keep-alive connection is closed after the idle timeout.
    http_head_timeout_s: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    http_body_timeout_s: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    http_idle_timeout_s: float = Field(default=75.0, gt=0, allow_inf_nan=False)

    # Offers (docs/OFFERS.md). `auto` books the chosen driver at once; `cascade` and
    # `wave` offer the job and wait for an accept. Unset timeout and rounds take the
    # mode's defaults (cascade 20 s x 5 offers, wave 25 s x 3 waves).
    offer_mode: Mode = "auto"
    offer_timeout_s: float | None = Field(default=None, gt=0, le=3600)
    offer_wave_size: int = Field(default=DEFAULT_WAVE_SIZE, ge=1, le=50)
    offer_max_rounds: int | None = Field(default=None, ge=1, le=100)
    dispatch_deadline_s: float = Field(default=DEFAULT_DEADLINE_S, gt=0, le=86400)
    # The ingress's backstop: how often it looks for dispatches a wedged zone left open.
    offer_backstop_interval_s: float = Field(default=5.0, gt=0)

    # The operator page (docs/OPS.md): base-map tiles only when given, so the page needs
    # no internet by default. An http(s) template with {z}, {x}, {y} (and maybe {s}).
    map_tile_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s\"'<>]+$", max_length=500
    )
    map_tile_attribution: str | None = Field(default=None, max_length=500)

    def offer_rules(self) -> OfferRules:
        return OfferRules.of(
            self.offer_mode,
            timeout_s=self.offer_timeout_s,
            wave_size=self.offer_wave_size,
            max_rounds=self.offer_max_rounds,
            deadline_s=self.dispatch_deadline_s,
        )


class ResolvedSettings(Settings):
    """Settings after embedded servers started and secrets were loaded."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    database_url: str
    redis_url: str
    vendure_webhook_secret: str
    inbound_secret: str
    admin_token: str
