// The operator page: asks for the operator token, then polls GET /ops/snapshot and draws it.
// The token lives in sessionStorage (this tab only) and travels in the Authorization
// header, never in a URL. Every piece of data reaches the page as text (textContent),
// never as markup. Served under a CSP that allows no inline script.
"use strict";

(function () {
  const TOKEN_KEY = "dispatcher.ops.token";
  // Short polling: the next request leaves this long after the previous answer.
  const POLL_MS = 1000;
  const TICK_MS = 250;
  // Lists longer than this show their head and a count: the DOM stays small.
  const LIST_MAX = 200;
  const COLOURS = {
    available: "#1a9850",
    offered: "#f39c12",
    busy: "#2c7bb6",
    stale: "#8c8c8c",
  };

  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  let map = null;
  let zoneLayer = null;
  let driverLayer = null;
  let tiles = null;
  let fitted = false;
  const zones = new Map();
  const markers = new Map();
  // Server clock minus this browser's, from each snapshot's `at`: countdowns use it.
  let clockOffsetMs = 0;
  let pollTimer = null;
  // Bumped at each login and logout, so a late answer of an old session is dropped.
  let session = 0;

  function escapeText(text) {
    const div = document.createElement("div");
    div.textContent = text;
    return div.innerHTML;
  }

  function showLogin(message) {
    $("ops").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("token").focus();
  }

  function clearData() {
    for (const id of ["queue-offered", "queue-waiting", "queue-unassigned", "deliveries"]) {
      $(id).replaceChildren();
    }
    for (const el of document.querySelectorAll("[data-count]")) {
      el.textContent = "–";
    }
    if (driverLayer) driverLayer.clearLayers();
    if (zoneLayer) zoneLayer.clearLayers();
    markers.clear();
    zones.clear();
    fitted = false;
    if (map) map.getContainer().dataset.drivers = "0";
  }

  async function fetchSnapshot(token) {
    const response = await fetch("/ops/snapshot", {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401 || response.status === 403) {
      throw new AuthError("the service refused this token (HTTP " + response.status + ")");
    }
    if (!response.ok) {
      throw new Error("snapshot answered HTTP " + response.status);
    }
    return response.json();
  }

  function ensureMap() {
    if (map) return;
    map = L.map("map", { zoomControl: true, worldCopyJump: true }).setView([20, 0], 2);
    zoneLayer = L.layerGroup().addTo(map);
    driverLayer = L.layerGroup().addTo(map);
    map.getContainer().dataset.drivers = "0";
  }

  function drawTiles(config) {
    if (tiles || !config.tileUrl) return;
    tiles = L.tileLayer(config.tileUrl, {
      maxZoom: 19,
      attribution: escapeText(config.tileAttribution || ""),
    }).addTo(map);
  }

  function drawZones(list) {
    const seen = new Set();
    for (const zone of list) {
      seen.add(zone.zoneId);
      let polygon = zones.get(zone.zoneId);
      if (!polygon) {
        polygon = L.polygon(zone.outline, {
          color: "#4a5a6a",
          weight: 1,
          fillOpacity: 0.04,
          className: "zone",
        }).addTo(zoneLayer);
        zones.set(zone.zoneId, polygon);
      }
      polygon.unbindTooltip();
      polygon.bindTooltip(escapeText(zone.zoneId + ": " + zone.drivers + (zone.drivers === 1 ? " driver" : " drivers")), {
        sticky: true,
      });
    }
    for (const [id, polygon] of zones) {
      if (!seen.has(id)) {
        zoneLayer.removeLayer(polygon);
        zones.delete(id);
      }
    }
  }

  function driverLabel(driver) {
    const order = driver.sellerOrderId ? " · " + driver.sellerOrderId : "";
    return escapeText(driver.name + " (" + driver.driverId + ") · " + driver.state + order);
  }

  function drawDrivers(list) {
    const seen = new Set();
    for (const driver of list) {
      seen.add(driver.driverId);
      const colour = COLOURS[driver.state] || COLOURS.stale;
      let marker = markers.get(driver.driverId);
      if (!marker) {
        marker = L.circleMarker([driver.lat, driver.lon], {
          radius: 6,
          weight: 1,
          color: "#222",
          fillColor: colour,
          fillOpacity: 0.9,
          className: "driver",
        }).addTo(driverLayer);
        markers.set(driver.driverId, marker);
        marker.getElement().dataset.driverId = driver.driverId;
      } else {
        const at = marker.getLatLng();
        if (at.lat !== driver.lat || at.lng !== driver.lon) {
          marker.setLatLng([driver.lat, driver.lon]);
        }
        if (marker.options.fillColor !== colour) marker.setStyle({ fillColor: colour });
      }
      const el = marker.getElement();
      el.dataset.state = driver.state;
      el.dataset.lat = String(driver.lat);
      el.dataset.lon = String(driver.lon);
      marker.unbindTooltip();
      marker.bindTooltip(driverLabel(driver));
    }
    for (const [id, marker] of markers) {
      if (!seen.has(id)) {
        driverLayer.removeLayer(marker);
        markers.delete(id);
      }
    }
    map.getContainer().dataset.drivers = String(markers.size);
  }

  function fitOnce(snapshot) {
    if (fitted) return;
    const points = snapshot.drivers.map((d) => [d.lat, d.lon]);
    for (const zone of snapshot.zones) points.push(...zone.outline);
    if (points.length === 0) return;
    map.fitBounds(L.latLngBounds(points), { padding: [20, 20], maxZoom: 14 });
    fitted = true;
  }

  // One list row: the order id (and a countdown) on top, what the operator needs below.
  function item(id, meta, extra) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "id";
    name.textContent = id;
    name.title = id;
    const below = document.createElement("span");
    below.className = "meta";
    below.textContent = meta;
    li.append(name);
    if (extra) li.append(extra);
    li.append(below);
    return li;
  }

  function countdown(isoTime) {
    const span = document.createElement("span");
    span.className = "countdown";
    span.dataset.until = String(Date.parse(isoTime));
    tickOne(span);
    return span;
  }

  function tickOne(span) {
    const left = Number(span.dataset.until) - (Date.now() + clockOffsetMs);
    const seconds = Math.max(0, Math.ceil(left / 1000));
    span.textContent = seconds + " s";
    span.classList.toggle("due", seconds <= 5);
  }

  function tick() {
    for (const span of document.querySelectorAll(".countdown")) tickOne(span);
  }

  function timeOf(isoTime) {
    return new Date(isoTime).toLocaleTimeString();
  }

  function fill(listId, rows, render, emptyText) {
    const items = rows.slice(0, LIST_MAX).map(render);
    if (rows.length === 0) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = emptyText;
      items.push(li);
    } else if (rows.length > LIST_MAX) {
      const li = document.createElement("li");
      li.className = "more";
      li.textContent = "and " + (rows.length - LIST_MAX) + " more";
      items.push(li);
    }
    $(listId).replaceChildren(...items);
  }

  function drawLists(snapshot) {
    const q = snapshot.queue;
    fill(
      "queue-offered",
      q.offered,
      (o) => {
        const first = o.offers[0];
        const who = o.offers.length === 1 ? first.driverId : o.offers.length + " drivers";
        return item(o.sellerOrderId, who + " · round " + o.round, countdown(first.expiresAt));
      },
      "none",
    );
    fill(
      "queue-waiting",
      q.waiting,
      (o) => item(o.sellerOrderId, "round " + o.round, countdown(o.deadlineAt)),
      "none",
    );
    fill(
      "queue-unassigned",
      q.unassigned,
      (o) => item(o.sellerOrderId, (o.reason || "UNASSIGNED") + " · " + timeOf(o.since)),
      "none",
    );
    const more = snapshot.counts.unassigned - q.unassigned.length;
    if (more > 0) {
      const li = document.createElement("li");
      li.className = "more";
      li.textContent = "and " + more + " older";
      $("queue-unassigned").append(li);
    }
    fill(
      "deliveries",
      snapshot.deliveries,
      (d) =>
        item(
          d.sellerOrderId,
          d.driverId + " · " + (d.status === "PICKED_UP" ? "on the way" : "to pick up"),
        ),
      "none",
    );
  }

  function drawCounts(counts) {
    for (const el of document.querySelectorAll("[data-count]")) {
      const value = counts[el.dataset.count];
      el.textContent = value === undefined ? "–" : String(value);
    }
  }

  function render(snapshot, elapsedMs) {
    clockOffsetMs = Date.parse(snapshot.at) - Date.now();
    ensureMap();
    drawTiles(snapshot.map);
    drawZones(snapshot.zones);
    drawDrivers(snapshot.drivers);
    fitOnce(snapshot);
    drawLists(snapshot);
    drawCounts(snapshot.counts);
    const status = $("status");
    status.classList.remove("error");
    status.textContent =
      "updated " + timeOf(snapshot.at) + " · " + Math.round(elapsedMs) + " ms · mode " +
      snapshot.offerMode;
    document.body.dataset.snapshotAt = snapshot.at;
  }

  async function poll(mine) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (mine !== session || !token) return;
    const started = performance.now();
    try {
      const snapshot = await fetchSnapshot(token);
      if (mine !== session) return;
      $("login").hidden = true;
      if ($("ops").hidden) {
        $("ops").hidden = false;
        // A map drawn while hidden has no size: measure it again now it shows.
        if (map) map.invalidateSize();
      }
      render(snapshot, performance.now() - started);
    } catch (error) {
      if (mine !== session) return;
      if (error instanceof AuthError) {
        logout("Wrong token: " + error.message + ".");
        return;
      }
      const status = $("status");
      status.classList.add("error");
      status.textContent = "no answer (" + error.message + "): retrying";
    }
    pollTimer = setTimeout(() => poll(mine), POLL_MS);
  }

  function start() {
    clearTimeout(pollTimer);
    session += 1;
    poll(session);
  }

  function logout(message) {
    clearTimeout(pollTimer);
    session += 1;
    sessionStorage.removeItem(TOKEN_KEY);
    clearData();
    showLogin(message);
  }

  function main() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const token = input.value.trim();
      input.value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      start();
    });
    $("logout").addEventListener("click", () => logout(""));
    // A tab brought back to the front asks at once rather than at its throttled timer.
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && sessionStorage.getItem(TOKEN_KEY)) start();
    });
    setInterval(tick, TICK_MS);
    if (sessionStorage.getItem(TOKEN_KEY)) {
      start();
    } else {
      showLogin("");
    }
  }

  main();
})();
