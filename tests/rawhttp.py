"""Raw-socket HTTP/1.1 for tests: send exact bytes, read the answer the server gives."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

# Generous: a loaded machine 3x slower still answers well within it.
READ_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answer(raw: bytes, closed: bool) -> RawAnswer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return RawAnswer(status, headers, body[:length], closed)


async def exchange(
    host: str, port: int, request: bytes, *, timeout_s: float = READ_TIMEOUT_S
) -> RawAnswer:
    """Send `request` as is and read one answer (until Content-Length is met or EOF)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        raw = b""
        closed = False
        async with asyncio.timeout(timeout_s):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                raw += chunk
                head, sep, body = raw.partition(b"\r\n\r\n")
                if sep and b"content-length:" in head.lower():
                    answer = parse_answer(raw, False)
                    if len(body) >= int(answer.headers["content-length"]):
                        break
        if not closed:
            # Did the server close after answering? A short wait tells.
            try:
                async with asyncio.timeout(1.0):
                    closed = await reader.read(1) == b""
            except TimeoutError:
                closed = False
        return parse_answer(raw, closed)
    finally:
        writer.close()
