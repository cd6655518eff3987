"""StandbyKeeper: keeps a standby incarnation of each zone this ingress uses, on another node.

Runs in every ingress replica when `zone_standby` is on. Each pass looks at each zone's
two slots: the one Ray's KV names holds the zone; the other must exist, be idle and sit
on a node that is open to zones and, when the cluster has another, not the live one's.
A standby that is missing is created; one that is misplaced is removed and created
again. Replicas doing this at once is harmless: actors are created by name (get if
exists), and a standby never takes the zone unless the KV names its slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from dispatcher.actors.hosting import (
    excluded_nodes,
    live_slot,
    zone_hosts,
    zone_placement,
    zone_target,
)
from dispatcher.actors.options import ZoneSlot, other_slot, zone_actor_name
from dispatcher.actors.zone import ZoneActorRemote
from dispatcher.config import ResolvedSettings
from dispatcher.messages import ZonePlacement

log = logging.getLogger(__name__)

# How often each zone's standby is checked: a standby lost with a node is back (a new
# process) a few seconds after this.
CHECK_INTERVAL_S = 2.0
# A zone taken this recently gets no new standby yet: starting a process costs a second
# or more of CPU, which a node's zones just taken over by their standbys need more.
SETTLE_S = 5.0
# A zone that does not say where it is within this long is skipped until the next pass.
WHERE_TIMEOUT_S = 5.0


class StandbyKeeper:
    def __init__(
        self,
        settings: ResolvedSettings,
        settings_json: str,
        zones: Callable[[], list[str]],
    ) -> None:
        self.settings = settings
        self._settings_json = settings_json
        self._zones = zones

    async def run_forever(self) -> None:
        while True:
            for zone_id in self._zones():
                try:
                    await asyncio.to_thread(self.keep, zone_id)
                except Exception:
                    log.exception("zone %s: standby check failed", zone_id)
            await asyncio.sleep(CHECK_INTERVAL_S)

    def keep(self, zone_id: str) -> None:
        """One check of one zone's standby (blocking: GCS round trips)."""
        namespace = self.settings.ray_namespace
        if zone_target(namespace, zone_id) is not None:
            return  # a handoff is placing this zone's incarnations itself
        live = live_slot(namespace, zone_id)
        standby = other_slot(live)
        live_where = _where(zone_id, live, namespace)
        if live_where is None or live_where.state != "active":
            return  # not started, restarting or moving: nothing to stand by for yet
        if time.time() - live_where.active_at < SETTLE_S:
            return  # just taken (a failover): let it serve before starting processes
        excluded = excluded_nodes(namespace)
        try:
            handle: Any = ray.get_actor(zone_actor_name(zone_id, standby), namespace)
        except ValueError:
            self._create(zone_id, standby, live_where.node_id)
            return
        where = _where(zone_id, standby, namespace)
        if where is None:
            return  # starting, or busy: look again next pass
        if where.state == "fenced":
            # It held the zone until its standby took over: it stops acting for the
            # zone and waits for the KV to name its slot again.
            ray.get(handle.stand_by.remote(), timeout=WHERE_TIMEOUT_S)
            return
        misplaced = where.node_id in excluded or (
            where.node_id == live_where.node_id
            and any(
                node != live_where.node_id
                for node in zone_hosts(self.settings.zone_resource_units, excluded)
            )
        )
        # Never the live one: a takeover may have named this slot since we looked.
        if misplaced and live_slot(namespace, zone_id) == live:
            log.info(
                "zone %s: standby %s on node %s moves off it",
                zone_id,
                standby,
                where.node_id,
            )
            ray.kill(handle, no_restart=True)
        elif where.state == "idle":
            # Its connections open and warm, so that a takeover does not wait for them.
            try:
                ray.get(handle.prepare.remote(), timeout=WHERE_TIMEOUT_S)
            except (RayTaskError, GetTimeoutError, RayActorError) as exc:
                log.info("zone %s: standby %s not prepared: %s", zone_id, standby, exc)

    def _create(self, zone_id: str, slot: ZoneSlot, live_node: str) -> None:
        options = zone_placement(
            zone_id,
            self.settings.ray_namespace,
            resource_units=self.settings.zone_resource_units,
            slot=slot,
            away_from=live_node,
            standby=True,
        )
        ZoneActorRemote.options(**options).remote(zone_id, self._settings_json, slot)
        log.info(
            "zone %s: standby %s started (live on node %s)", zone_id, slot, live_node
        )


def _where(zone_id: str, slot: ZoneSlot, namespace: str) -> ZonePlacement | None:
    try:
        handle: Any = ray.get_actor(zone_actor_name(zone_id, slot), namespace)
        placement: ZonePlacement = ray.get(
            handle.where.remote(), timeout=WHERE_TIMEOUT_S
        )
        return placement
    except (ValueError, GetTimeoutError, RayActorError):
        return None
