"""The operator's live page: GET /ops, its assets under /ops/static/, its JSON snapshot.

The page and its assets need no token (they hold no data); the snapshot needs the
operator token in the Authorization header, which the page asks for and keeps in
sessionStorage, never in a URL. A strict Content-Security-Policy allows only this
origin's scripts and styles (no inline script) and, when configured, the tile server's
images.
"""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from dispatcher.api.auth import require_operator
from dispatcher.api.keys import DISPATCHER, OPS_VIEW, PG_POOL, SETTINGS
from dispatcher.api.opsmodels import OpsSnapshot
from dispatcher.api.opsview import OpsView
from dispatcher.api.spec import RouteSpec
from dispatcher.errors import NotFoundError

ASSETS = Path(__file__).resolve().parents[1] / "opsassets"
INDEX = ASSETS / "index.html"
# Every file the page may load, fixed at import: a request names one of these or gets 404.
STATIC: dict[str, Path] = {
    p.relative_to(ASSETS).as_posix(): p
    for p in sorted(ASSETS.rglob("*"))
    if p.is_file() and p.name != "index.html"
}
TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
}
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def tile_origin(tile_url: str | None) -> str | None:
    """The CSP source of a tile template: its scheme and host, `{s}` as a wildcard label."""
    if tile_url is None:
        return None
    parts = urlsplit(tile_url.replace("{s}", "tilesubdomain"))
    host = parts.netloc.replace("tilesubdomain", "*")
    return f"{parts.scheme}://{host}"


def content_security_policy(tile_url: str | None) -> str:
    images = " ".join(filter(None, ["'self'", "data:", tile_origin(tile_url)]))
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {images}",
            "connect-src 'self'",
            "base-uri 'none'",
            # The login form is handled by script; a form that submitted itself would
            # put the token into a request, so none may.
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


async def page(request: web.Request) -> web.StreamResponse:
    csp = content_security_policy(request.app[SETTINGS].map_tile_url)
    return web.Response(
        body=INDEX.read_bytes(),
        content_type="text/html",
        charset="utf-8",
        headers={
            **COMMON_HEADERS,
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
        },
    )


async def static(request: web.Request) -> web.StreamResponse:
    path = STATIC.get(request.match_info["path"])
    if path is None:
        raise NotFoundError("no such asset of the operator page")
    kind = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    headers = dict(COMMON_HEADERS)
    if kind is not None:
        headers["Content-Type"] = kind
    return web.FileResponse(path, headers=headers)


async def snapshot(request: web.Request) -> web.StreamResponse:
    await require_operator(request)
    # Pings are written behind: the ones this ingress acknowledged are drawn too.
    await request.app[DISPATCHER].settle_pings()
    body = (await request.app[OPS_VIEW].snapshot()).model_dump_json()
    response = web.Response(
        text=body,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
    # About 120 bytes a driver; gzip takes a 2,000-driver snapshot to a fraction.
    response.enable_compression()
    return response


async def ops_view_context(app: web.Application) -> AsyncIterator[None]:
    """After the pool (app._postgres): the snapshot reads through it."""
    app[OPS_VIEW] = OpsView(app[PG_POOL], app[SETTINGS])
    yield


def add_page_routes(app: web.Application) -> None:
    """The HTML page and its files: not part of the JSON API (nor of /openapi.json)."""
    app.router.add_get("/ops", page)
    app.router.add_get("/ops/static/{path:.+}", static)


ROUTES = [
    RouteSpec(
        "GET",
        "/ops/snapshot",
        snapshot,
        "What the operator page shows: zones, drivers by state, the order queue,"
        " deliveries in progress and their counts",
        "operator",
        {200: OpsSnapshot},
        errors=(401, 403, 503),
        tags=("ops",),
    ),
]
