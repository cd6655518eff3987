"""The request file both load generators read: one HTTP request per line, tab-separated."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


class RequestSpec(NamedTuple):
    """One HTTP request exactly as sent."""

    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


# Line format: METHOD \t PATH \t Name: value \x1f Name: value \t BODY

HEADER_SEP = "\x1f"


def encode_line(spec: RequestSpec) -> bytes:
    for part in (spec.method, spec.path, *(f"{k}{v}" for k, v in spec.headers)):
        if any(c in part for c in "\t\n\x1f"):
            raise ValueError(f"request field holds a separator: {part!r}")
    if any(c in spec.body for c in b"\t\n"):
        raise ValueError("request body holds a tab or newline")
    headers = HEADER_SEP.join(f"{k}: {v}" for k, v in spec.headers)
    return f"{spec.method}\t{spec.path}\t{headers}\t".encode() + spec.body + b"\n"


def decode_line(line: bytes) -> RequestSpec:
    method, path, headers, body = line.rstrip(b"\n").split(b"\t", 3)
    pairs = []
    for entry in headers.decode().split(HEADER_SEP) if headers else []:
        name, _, value = entry.partition(": ")
        pairs.append((name, value))
    return RequestSpec(method.decode(), path.decode(), tuple(pairs), body)


def write_requests(path: Path, specs: Iterable[RequestSpec]) -> int:
    """Write the file (mode 0600: it holds tokens); returns how many requests."""
    count = 0
    path.touch(mode=0o600)
    with path.open("wb") as fh:
        for spec in specs:
            fh.write(encode_line(spec))
            count += 1
    return count


def read_requests(path: Path) -> list[RequestSpec]:
    with path.open("rb") as fh:
        return [decode_line(line) for line in fh if line.strip()]
