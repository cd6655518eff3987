"""Typed application keys for everything the handlers share."""

from __future__ import annotations

from typing import Any

import asyncpg
from aiohttp import web

from dispatcher.api.event_hub import EventHub
from dispatcher.api.metrics import Metrics
from dispatcher.api.opsview import OpsView
from dispatcher.api.service import Dispatcher
from dispatcher.config import ResolvedSettings
from dispatcher.store.geo import GeoMirror
from dispatcher.store.inbound_ids import InboundIdStore
from dispatcher.webhooks.sender import WebhookSender

SETTINGS = web.AppKey("settings", ResolvedSettings)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
MIRROR = web.AppKey("mirror", GeoMirror)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
SENDER = web.AppKey("webhook_sender", WebhookSender)
METRICS = web.AppKey("metrics", Metrics)
OPENAPI = web.AppKey("openapi", dict[str, Any])
EVENT_HUB = web.AppKey("event_hub", EventHub)
INBOUND_IDS = web.AppKey("inbound_ids", InboundIdStore)
OPS_VIEW = web.AppKey("ops_view", OpsView)
