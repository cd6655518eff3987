"""Standard Webhooks signatures: sign outgoing messages, verify incoming ones."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from secrets import token_bytes

SECRET_PREFIX = "whsec_"
# 256 bits, SHA-256's own strength: a longer key adds nothing, a shorter one weakens it.
SECRET_BYTES = 32
# The API's ±5 min (docs/API.md#authentication): long enough for clock skew and queueing, short enough to bound replays.
DEFAULT_TOLERANCE_S = 300
SIGNATURE_VERSION = "v1"
# Unix seconds as plain digits; twelve of them reach the year 33658, so anything longer is
# garbage, and the cap keeps int() away from huge attacker-chosen strings.
_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")


class InvalidSignatureError(Exception):
    """The request's Standard Webhooks headers do not authenticate its body."""


@dataclass(frozen=True, slots=True)
class SignedMessage:
    """What a verified message's headers say: its id and the signed Unix timestamp."""

    webhook_id: str
    timestamp: int


def decode_secret(secret: str) -> bytes:
    """Return the HMAC key inside a `whsec_<base64>` secret; ValueError if malformed."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"webhook secret must start with {SECRET_PREFIX!r}")
    encoded = secret[len(SECRET_PREFIX) :]
    # Some issuers strip the '=' padding; restore it rather than reject their keys.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        # `from None`: the chained error adds nothing and we never echo secret material.
        raise ValueError(
            f"webhook secret must be {SECRET_PREFIX!r} followed by base64"
        ) from None
    if not key:
        raise ValueError("webhook secret has an empty key")
    return key


def new_secret() -> str:
    """Return a fresh random `whsec_` secret."""
    return SECRET_PREFIX + base64.b64encode(token_bytes(SECRET_BYTES)).decode("ascii")


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `webhook-signature` entry `v1,<base64>` for one message."""
    digest = _digest(decode_secret(secret), msg_id, str(timestamp), body)
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _header(headers: Mapping[str, str], name: str) -> str:
    """Case-insensitive lookup: plain dicts keep whatever case the sender used."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    if value is None or not value.strip():
        raise InvalidSignatureError(f"missing {name} header")
    # aiohttp hands non-UTF-8 header bytes over as surrogates, which cannot be encoded
    # for the HMAC; every value Standard Webhooks defines is printable ASCII anyway.
    if not (value.isascii() and value.isprintable()):
        raise InvalidSignatureError(f"{name} header is not printable ASCII")
    return value.strip()


def _candidate_signatures(header: str) -> list[bytes]:
    """Decoded v1 signatures from the header; entries of other versions are skipped."""
    found: list[bytes] = []
    for entry in header.split():
        version, sep, encoded = entry.partition(",")
        if not sep:
            raise InvalidSignatureError("malformed webhook-signature header")
        if version != SIGNATURE_VERSION:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            # One undecodable entry must not hide a valid one next to it.
            continue
    return found


def verify(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> str:
    """Check the Standard Webhooks headers against the raw body; return the webhook-id.

    See verify_message, which this wraps.
    """
    return verify_message(
        secrets, headers, body, now=now, tolerance_s=tolerance_s
    ).webhook_id


def verify_message(
    secrets: Sequence[str],
    headers: Mapping[str, str],
    body: bytes,
    *,
    now: float | None = None,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
) -> SignedMessage:
    """Check the Standard Webhooks headers against the raw body; return id and timestamp.

    Any `v1` entry matching any of `secrets` is enough, so keys can be rotated. Raises
    InvalidSignatureError when the request is not authentic, ValueError when a secret is
    malformed (a configuration error, not the sender's fault).
    """
    if isinstance(secrets, str):
        # A bare string is a Sequence[str] of characters: never what the caller meant.
        raise TypeError("secrets must be a sequence of secrets, not one string")
    keys = [decode_secret(secret) for secret in secrets]
    if not keys:
        raise ValueError("no webhook secret to verify with")

    msg_id = _header(headers, "webhook-id")
    raw_timestamp = _header(headers, "webhook-timestamp")
    raw_signature = _header(headers, "webhook-signature")

    if not _TIMESTAMP_RE.fullmatch(raw_timestamp):
        raise InvalidSignatureError("webhook-timestamp is not Unix seconds")
    current = time.time() if now is None else now
    if abs(current - int(raw_timestamp)) > tolerance_s:
        raise InvalidSignatureError(
            "webhook-timestamp is outside the allowed tolerance"
        )

    candidates = _candidate_signatures(raw_signature)
    if not candidates:
        raise InvalidSignatureError("no v1 signature in webhook-signature header")
    for key in keys:
        # The header's own digits are what the sender signed.
        expected = _digest(key, msg_id, raw_timestamp, body)
        for candidate in candidates:
            if hmac.compare_digest(expected, candidate):
                return SignedMessage(msg_id, int(raw_timestamp))
    raise InvalidSignatureError("no matching signature")
