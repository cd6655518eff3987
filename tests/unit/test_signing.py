"""Standard Webhooks signing and verification, checked against the reference package."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from dispatcher.webhooks.signing import (
    InvalidSignatureError,
    decode_secret,
    new_secret,
    sign,
    verify,
)

BODY = b'{"type":"delivery.assigned","data":{"sellerOrderId":"SO-1001"}}'
MSG_ID = "msg_0123456789abcdef"
# The example secret from the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def headers_for(
    secret: str, *, msg_id: str = MSG_ID, ts: int | None = None, body: bytes = BODY
) -> dict[str, str]:
    timestamp = int(time.time()) if ts is None else ts
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def test_round_trip_returns_webhook_id() -> None:
    secret = new_secret()
    assert verify([secret], headers_for(secret), BODY) == MSG_ID


def test_new_secret_is_fresh_whsec_with_32_bytes() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith("whsec_")
    assert len(decode_secret(first)) == 32


def test_spec_example_signature() -> None:
    # Known answer from the Standard Webhooks specification.
    signature = sign(
        SPEC_SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_reference_package_accepts_our_signatures() -> None:
    secret = new_secret()
    payload = Webhook(secret).verify(BODY, headers_for(secret))
    assert payload["data"]["sellerOrderId"] == "SO-1001"


def test_we_accept_reference_package_signatures() -> None:
    secret = new_secret()
    now = datetime.now(UTC).replace(microsecond=0)
    signature = Webhook(secret).sign(MSG_ID, now, BODY.decode())
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert verify([secret], headers, BODY) == MSG_ID


def test_reference_package_rejects_a_wrong_key() -> None:
    headers = headers_for(new_secret())
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_replay_older_than_tolerance_is_rejected() -> None:
    secret = new_secret()
    now = time.time()
    with pytest.raises(InvalidSignatureError, match="tolerance"):
        verify([secret], headers_for(secret, ts=int(now) - 301), BODY, now=now)


def test_timestamp_just_inside_tolerance_is_accepted() -> None:
    secret = new_secret()
    now = 1_800_000_000.0
    assert (
        verify([secret], headers_for(secret, ts=1_800_000_000 - 300), BODY, now=now)
        == MSG_ID
    )
    assert (
        verify([secret], headers_for(secret, ts=1_800_000_000 + 300), BODY, now=now)
        == MSG_ID
    )


def test_future_timestamp_is_rejected() -> None:
    secret = new_secret()
    now = time.time()
    with pytest.raises(InvalidSignatureError, match="tolerance"):
        verify([secret], headers_for(secret, ts=int(now) + 301), BODY, now=now)


def test_custom_tolerance() -> None:
    secret = new_secret()
    now = 1_800_000_000.0
    headers = headers_for(secret, ts=1_800_000_000 - 60)
    with pytest.raises(InvalidSignatureError):
        verify([secret], headers, BODY, now=now, tolerance_s=30)


def test_body_changed_by_one_byte_is_rejected() -> None:
    secret = new_secret()
    headers = headers_for(secret)
    tampered = BODY.replace(b"1001", b"1002")
    assert len(tampered) == len(BODY)
    with pytest.raises(InvalidSignatureError, match="no matching signature"):
        verify([secret], headers, tampered)


def test_changed_webhook_id_is_rejected() -> None:
    secret = new_secret()
    headers = headers_for(secret)
    headers["webhook-id"] = "msg_other"
    with pytest.raises(InvalidSignatureError):
        verify([secret], headers, BODY)


@pytest.mark.parametrize(
    "missing", ["webhook-id", "webhook-timestamp", "webhook-signature"]
)
def test_missing_header_is_rejected(missing: str) -> None:
    secret = new_secret()
    headers = headers_for(secret)
    del headers[missing]
    with pytest.raises(InvalidSignatureError, match=f"missing {missing}"):
        verify([secret], headers, BODY)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("webhook-timestamp", "not-a-number"),
        ("webhook-timestamp", "1614265330.5"),
        ("webhook-timestamp", "-1614265330"),
        ("webhook-timestamp", "9" * 5000),
        ("webhook-timestamp", ""),
        ("webhook-signature", "v1"),
        ("webhook-signature", "garbage"),
        ("webhook-signature", "v1,!!!not-base64!!!"),
        ("webhook-signature", "v1,"),
        ("webhook-id", "   "),
    ],
)
def test_malformed_header_is_rejected(name: str, value: str) -> None:
    secret = new_secret()
    headers = headers_for(secret)
    headers[name] = value
    with pytest.raises(InvalidSignatureError):
        verify([secret], headers, BODY)


def test_header_names_are_case_insensitive() -> None:
    secret = new_secret()
    headers = {k.title(): v for k, v in headers_for(secret).items()}
    assert "Webhook-Signature" in headers
    assert verify([secret], headers, BODY) == MSG_ID


def test_wrong_key_is_rejected() -> None:
    with pytest.raises(InvalidSignatureError, match="no matching signature"):
        verify([new_secret()], headers_for(new_secret()), BODY)


def test_several_v1_entries_either_key_valid() -> None:
    old, new = new_secret(), new_secret()
    ts = int(time.time())
    both = f"{sign(old, MSG_ID, ts, BODY)} {sign(new, MSG_ID, ts, BODY)}"
    headers = {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(ts),
        "webhook-signature": both,
    }
    assert verify([old], headers, BODY) == MSG_ID
    assert verify([new], headers, BODY) == MSG_ID
    with pytest.raises(InvalidSignatureError):
        verify([new_secret()], headers, BODY)


def test_any_of_several_secrets_is_enough() -> None:
    current, previous = new_secret(), new_secret()
    assert verify([current, previous], headers_for(previous), BODY) == MSG_ID
    assert verify([current, previous], headers_for(current), BODY) == MSG_ID


def test_non_v1_entries_are_ignored() -> None:
    secret = new_secret()
    headers = headers_for(secret)
    good = headers["webhook-signature"]
    # A v1a (asymmetric) entry and a junk version around the valid v1 entry.
    headers["webhook-signature"] = (
        f"v1a,{base64.b64encode(b'x' * 64).decode()} {good} v2,abc="
    )
    assert verify([secret], headers, BODY) == MSG_ID


def test_only_non_v1_entries_are_rejected() -> None:
    secret = new_secret()
    headers = headers_for(secret)
    v1 = headers["webhook-signature"]
    headers["webhook-signature"] = "v2" + v1[2:]
    with pytest.raises(InvalidSignatureError, match="no v1"):
        verify([secret], headers, BODY)


def test_undecodable_v1_entry_does_not_hide_a_valid_one() -> None:
    secret = new_secret()
    headers = headers_for(secret)
    headers["webhook-signature"] = "v1,%%% " + headers["webhook-signature"]
    assert verify([secret], headers, BODY) == MSG_ID


def test_messages_never_contain_secret_or_expected_signature() -> None:
    secret = new_secret()
    ts = int(time.time())
    expected = sign(secret, MSG_ID, ts, BODY)
    headers = headers_for(new_secret(), ts=ts)
    with pytest.raises(InvalidSignatureError) as caught:
        verify([secret], headers, BODY)
    message = str(caught.value)
    assert secret[6:] not in message
    assert expected[3:] not in message


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "whsec_",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_not base64!",
        "whsec_@@@@",
    ],
)
def test_malformed_secret_is_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="webhook secret") as caught:
        sign(bad, MSG_ID, 0, BODY)
    if len(bad) > len("whsec_"):
        assert bad[6:] not in str(caught.value)
    with pytest.raises(ValueError, match="webhook secret"):
        verify([bad], headers_for(new_secret()), BODY)


def test_unpadded_secret_is_accepted() -> None:
    secret = new_secret().rstrip("=")
    assert verify([secret], headers_for(secret), BODY) == MSG_ID


def test_secrets_must_be_a_sequence_not_a_string() -> None:
    secret = new_secret()
    with pytest.raises(TypeError):
        verify(secret, headers_for(secret), BODY)
    with pytest.raises(ValueError):
        verify([], headers_for(secret), BODY)
