"""A minimal keep-alive HTTP/1.1 client for the load generator: pre-encoded requests, one in flight per connection.

aiohttp's client costs about 0.3 ms of CPU per request here; at 3,000 requests/s that is most of
one of the machine's two cores, taken from the server being measured. This client writes bytes
prepared in advance and parses only the status line, Content-Length and chunked framing.
"""

from __future__ import annotations

import asyncio
import collections
from urllib.parse import urlsplit

from dispatcher.bench.reqfile import RequestSpec

# Largest response head accepted; anything longer is not a server we benchmark.
MAX_HEAD_BYTES = 64 * 1024


class HttpError(Exception):
    """The connection failed or the answer was not HTTP/1.1 we understand."""


def encode_request(spec: RequestSpec, host: str) -> bytes:
    """The request's bytes: keep-alive, Content-Length always set."""
    lines = [f"{spec.method} {spec.path} HTTP/1.1", f"Host: {host}"]
    lines += [
        f"{k}: {v}"
        for k, v in spec.headers
        if k.lower() not in ("host", "content-length")
    ]
    lines.append(f"Content-Length: {len(spec.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + spec.body


def parse_response(buf: bytearray) -> tuple[int, bytes, bool, int] | None:
    """(status, body, keep_alive, bytes used) once `buf` holds a whole response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise HttpError("response head too long")
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {head[0]!r}")
    status = int(parts[1])
    fields: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    keep_alive = fields.get("connection", "").lower() != "close"
    start = end + 4
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return _parse_chunked(buf, start, status, keep_alive)
    length = int(fields.get("content-length", "0"))
    if len(buf) < start + length:
        return None
    return status, bytes(buf[start : start + length]), keep_alive, start + length


def _parse_chunked(
    buf: bytearray, pos: int, status: int, keep_alive: bool
) -> tuple[int, bytes, bool, int] | None:
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", line_end)
            if trailer_end < 0:
                return None
            return status, bytes(body), keep_alive, trailer_end + 4
        chunk_start = line_end + 2
        if len(buf) < chunk_start + size + 2:
            return None
        body += buf[chunk_start : chunk_start + size]
        pos = chunk_start + size + 2


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            parsed = parse_response(self.buf)
        except (HttpError, ValueError) as exc:
            self.waiter.set_exception(HttpError(str(exc)))
            return
        if parsed is not None:
            status, body, keep_alive, used = parsed
            del self.buf[:used]
            self.waiter.set_result((status, body, keep_alive))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(
                HttpError(f"connection lost: {exc or 'closed by server'}")
            )

    async def send(self, data: bytes) -> tuple[int, bytes, bool]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpPool:
    """Up to `limit` keep-alive connections to one server; callers wait for a free one."""

    def __init__(self, base_url: str, limit: int) -> None:
        url = urlsplit(base_url)
        if url.scheme != "http" or url.hostname is None or url.port is None:
            raise ValueError(f"need http://host:port, not {base_url!r}")
        self.host, self.port = url.hostname, url.port
        self.authority = f"{url.hostname}:{url.port}"
        self.limit = limit
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = (
            collections.deque()
        )

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._open -= 1
        if self._open < self.limit:
            self._open += 1
            try:
                _, proto = await asyncio.get_running_loop().create_connection(
                    _Connection, self.host, self.port
                )
            except BaseException as exc:
                self._open -= 1
                self._wake()
                if isinstance(exc, OSError):
                    raise HttpError(f"connect failed: {exc}") from exc
                raise
            return proto
        waiter: asyncio.Future[_Connection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        handed = await waiter
        return handed if handed is not None else await self._acquire()

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if not reusable or conn.closed:
            conn.close()
            self._open -= 1
            self._wake()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _wake(self) -> None:
        """A slot freed without a connection to hand over: let one waiter open its own."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def request(self, data: bytes) -> tuple[int, bytes]:
        """Send pre-encoded request bytes; (status, body). HttpError on failure."""
        conn = await self._acquire()
        try:
            status, body, keep_alive = await conn.send(data)
        except BaseException:
            self._release(conn, reusable=False)
            raise
        self._release(conn, reusable=keep_alive)
        return status, body

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
