"""Service fixtures (a pytest plugin): one real local Ray per session, the ingress over real servers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import ray
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from dispatcher.actors.core import ZoneCore
from dispatcher.actors.options import zone_actor_name
from dispatcher.api.app import create_app
from dispatcher.api.http_server import IngressRunner
from dispatcher.api.zoneclient import ZoneDirectory
from dispatcher.config import ResolvedSettings
from dispatcher.rayenv import apply_ray_env
from dispatcher.store.deliveries import DeliveryStore
from dispatcher.store.drivers import DriverStore
from dispatcher.store.geo import GeoMirror, connect_redis
from dispatcher.store.pg import create_pool
from dispatcher.webhooks.signing import new_secret
from dispatcher.zoning import Zoning
from tests.support import BERLIN, Api, WebhookReceiver

RAY_NAMESPACE = "dispatcher-test"

# Test-speed knobs: the same code paths, shorter waits.
FAST = {
    "sweep_interval_s": 0.5,
    "reconcile_interval_s": 3.0,
    "webhook_schedule_s": (0, 0.2, 0.4, 0.8, 1.6),
    "webhook_poll_interval_s": 0.1,
    "ping_flush_interval_ms": 2.0,
    "zone_resolution": 6,
    "ray_namespace": RAY_NAMESPACE,
}


class IngressTestServer(TestServer):
    """A TestServer that runs the app as `dispatcher serve` does (IngressRunner)."""

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        return IngressRunner(self.app, **kwargs)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Ray starts once per session (about 5 s and 1.7 GB): never per test."""
    if not ray.is_initialized():
        apply_ray_env()  # as `dispatcher serve` does
        ray.init(
            # Never attach to another session's cluster that ray.init() would autodetect.
            address="local",
            num_cpus=2,
            include_dashboard=False,
            namespace=RAY_NAMESPACE,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


def kill_zone_actors() -> None:
    """Zone actors are detached: end them so the next test starts from PostgreSQL."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["name"].startswith(
            (zone_actor_name("", "a"), zone_actor_name("", "b"))
        ):
            with contextlib.suppress(ValueError):
                ray.kill(
                    ray.get_actor(entry["name"], namespace=entry["namespace"]),
                    no_restart=True,
                )


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    hooks = WebhookReceiver(secret=new_secret())
    await hooks.start()
    yield hooks
    await hooks.stop()


@pytest.fixture
def make_settings(
    pg_dsn: str, redis_url: str, receiver: WebhookReceiver
) -> Callable[..., ResolvedSettings]:
    def make(**overrides: Any) -> ResolvedSettings:
        values: dict[str, Any] = {
            "database_url": pg_dsn,
            "redis_url": redis_url,
            "vendure_webhook_url": receiver.url,
            "vendure_webhook_secret": receiver.secret,
            "inbound_secret": new_secret(),
            "admin_token": "adm_test_" + new_secret()[6:20],
            **FAST,
            **overrides,
        }
        return ResolvedSettings.model_validate(values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., ResolvedSettings]) -> ResolvedSettings:
    return make_settings()


@pytest.fixture
async def start_api(
    ray_session: None,
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
    aiohttp_client: Any,
) -> AsyncIterator[Callable[[ResolvedSettings], Any]]:
    """Starts ingress apps on demand; zone actors are killed before tables are emptied."""

    clients: list[TestClient[Any, Any]] = []

    async def start(settings: ResolvedSettings) -> Api:
        server = IngressTestServer(create_app(settings, zones=ZoneDirectory(settings)))
        client: TestClient[Any, Any] = await aiohttp_client(server)
        clients.append(client)
        return Api(client, settings)

    yield start
    # Closing an app flushes its queued pings to their zones: before the zones go, or
    # the flush would start a zone actor that outlives the test.
    for client in clients:
        await client.close()
    await asyncio.to_thread(kill_zone_actors)


@pytest.fixture
async def api(
    start_api: Callable[[ResolvedSettings], Any], settings: ResolvedSettings
) -> Api:
    result: Api = await start_api(settings)
    return result


MakeCore = Callable[[], Awaitable[ZoneCore]]
# Heartbeats outlive any test that builds zone cores by hand.
CORE_TTL_S = 600.0


@pytest.fixture
async def zone_cores(
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
) -> AsyncIterator[MakeCore]:
    """Builds ZoneCores of BERLIN's zone, each with its own pool (stateless, as in the
    actor) and Redis client, as separate actor processes would have; `start()` is left
    to the test."""
    settings = make_settings(heartbeat_ttl_s=CORE_TTL_S)
    cores: list[ZoneCore] = []

    async def make() -> ZoneCore:
        pool = await create_pool(
            settings.database_url,
            max_size=3,
            command_timeout_s=settings.pg_timeout_s,
            stateless=True,
        )
        core = ZoneCore(
            Zoning(settings.zone_resolution).zone_of(*BERLIN),
            settings,
            drivers=DriverStore(pool),
            deliveries=DeliveryStore(pool),
            mirror=GeoMirror(
                connect_redis(settings.redis_url, settings.redis_timeout_s),
                settings.redis_timeout_s,
            ),
            zoning=Zoning(settings.zone_resolution),
        )
        cores.append(core)
        return core

    yield make
    for core in cores:
        await core.stop()
        await core.drivers.pool.close()
        with contextlib.suppress(Exception):
            await core.mirror.client.aclose()
