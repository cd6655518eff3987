"""Schemathesis against the served /openapi.json: every route, real tokens and signatures."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.errors import Unsatisfiable
from redis.asyncio import Redis
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dispatcher.api.app import ROUTES
from dispatcher.config import ResolvedSettings
from dispatcher.webhooks.signing import sign
from tests.support import BERLIN, Api, offset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Bounded for CI: this many generated cases per operation and mode, derandomized
# (the same cases every run), no example database, no shrinking.
MAX_EXAMPLES = 25
POSITIVE_CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Negative mode: invalid data must be refused with a 4xx, and never crash the service.
NEGATIVE_CHECKS = [*POSITIVE_CHECKS, negative_data_rejection]
# Positive mode: data the schema allows must be accepted. These answers are allowed
# anyway, since they are about who asks and what exists, not about the data's shape.
ACCEPTED_OR_STATEFUL = {401, 403, 404, 409, 429}
# Rules no JSON Schema can state, because they depend on the clock or on stored state:
# a 422 to schema-valid data must name one of them, or the schema is wrong.
STATEFUL_422 = (
    "implausible jump",  # faster than DISPATCHER_MAX_PING_SPEED_KMH since the last fix
    "outside the service area",  # DISPATCHER_MAX_ZONES reached
    "recordedAt is in the future",
    "recordedAt is out of range",
)
# Documented leniency (docs/API.md#location-pings): a gateway batch validates
# its items one by one and answers 200 with the bad ones in `rejected`; Vendure events
# ignore unknown fields. Invalid data there is not refused as a whole, by design.
LENIENT_NEGATIVE = {("POST", "/drivers/locations")}
REQUEST_TIMEOUT_S = 15.0
# Which credentials each route takes: the operator token, a driver's, a signature, none.
AUTH = {(route.method, route.path): route.auth for route in ROUTES}
# Schemathesis generates no credentials (we add valid ones: auth failures are covered in
# tests/integration/test_hostile_*.py and test_routes_*.py) and no undeclared query
# parameters (ignored by design, like unknown body fields on most routes).
CONFIG = {
    "generation": {"with-security-parameters": False, "allow-extra-parameters": False}
}


class StandardWebhooksAuth(requests.auth.AuthBase):
    """Signs the exact body bytes requests is about to send, as Vendure would."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        raw = body.encode() if isinstance(body, str) else body
        msg_id = "evt_" + uuid.uuid4().hex
        timestamp = int(time.time())
        request.headers["webhook-id"] = msg_id
        request.headers["webhook-timestamp"] = str(timestamp)
        request.headers["webhook-signature"] = sign(self.secret, msg_id, timestamp, raw)
        return request


@dataclass
class Credentials:
    admin: str
    driver_token: str
    driver_id: str
    seller_order_id: str
    inbound_secret: str


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    no_negative: list[str] = field(default_factory=list)


def _strategy(
    operation: Any, mode: GenerationMode, creds: Credentials
) -> st.SearchStrategy[Case[Any]]:
    """Generated cases, half of them on the real driver and order so success paths run."""
    generated = operation.as_strategy(generation_mode=mode)
    known = {
        "driverId": creds.driver_id,
        "sellerOrderId": creds.seller_order_id,
        "offerId": "ofr_unknown",
    }
    params = {p.name for p in operation.path_parameters}
    if not params:
        return generated  # type: ignore[no-any-return]
    fixed = operation.as_strategy(
        generation_mode=mode, path_parameters={name: known[name] for name in params}
    )
    return st.one_of(generated, fixed)


def _credentials_for(
    operation: Any, creds: Credentials, use_driver: bool
) -> dict[str, Any]:
    """Valid credentials of the kind the route takes (its RouteSpec.auth)."""
    auth = AUTH[(operation.method.upper(), operation.path)]
    if auth == "signature":
        return {"auth": StandardWebhooksAuth(creds.inbound_secret)}
    if auth == "operator" or (auth == "driver" and not use_driver):
        return {"headers": {"Authorization": f"Bearer {creds.admin}"}}
    if auth == "driver":
        return {"headers": {"Authorization": f"Bearer {creds.driver_token}"}}
    return {}


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    creds: Credentials,
    session: requests.Session,
    tally: Tally,
) -> None:
    """MAX_EXAMPLES cases of one operation in one mode; failures are collected, not raised."""
    label = f"{operation.method.upper()} {operation.path} [{mode.value}]"
    lenient = (operation.method.upper(), operation.path) in LENIENT_NEGATIVE
    # A WebSocket route (its 101 is documented) answers a plain HTTP request 426, whatever
    # the data: only an upgrade reaches it (tests/integration/test_driver_stream.py does).
    upgrade_only = "101" in operation.definition.raw.get("responses", {})
    checks = POSITIVE_CHECKS if mode.is_positive or lenient else NEGATIVE_CHECKS

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(operation, mode, creds), use_driver=st.booleans())
    def exercise(case: Case[Any], use_driver: bool) -> None:
        tally.cases[label] += 1
        kwargs = _credentials_for(operation, creds, use_driver)
        response = case.call(
            base_url=base_url, session=session, timeout=REQUEST_TIMEOUT_S, **kwargs
        )
        tally.statuses[response.status_code] += 1
        case.validate_response(
            response,
            checks=checks,
            headers=kwargs.get("headers"),
            transport_kwargs={"base_url": base_url, **kwargs},
        )
        if mode.is_positive and not (upgrade_only and response.status_code == 426):
            _check_positive_accepted(response)

    try:
        exercise()
    except Unsatisfiable:
        if mode.is_positive:
            raise
        # Nothing to make invalid (a GET without parameters): no negative case exists.
        tally.no_negative.append(label)
    except (
        Exception,
        BaseExceptionGroup,
    ) as exc:  # schemathesis' FailureGroup is a BaseExceptionGroup
        tally.failures.append(f"{label}: {exc}")


def _check_positive_accepted(response: Response) -> None:
    """Schema-valid data is accepted, or refused for a reason the schema cannot hold."""
    status = response.status_code
    if 200 <= status < 300 or status in ACCEPTED_OR_STATEFUL:
        return
    text = response.content.decode(errors="replace")
    detail = json.loads(text).get("detail", "") if status == 422 else ""
    if not any(rule in detail for rule in STATEFUL_422):
        sent = response.request.body
        raise AssertionError(
            f"valid data refused: {status} {text[:300]}\nrequest: {sent!r:.500}"
        )


def run_fuzz(doc: dict[str, Any], base_url: str, creds: Credentials) -> Tally:
    """Every operation in both modes; blocking (requests), so it runs off the event loop."""
    schema = schemathesis.openapi.from_dict(
        doc, config=schemathesis.Config.from_dict(CONFIG)
    )
    tally = Tally()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _fuzz(operation, mode, base_url, creds, session, tally)
    return tally


async def _seed(api: Api) -> Credentials:
    driver = await api.online_driver(*offset(*BERLIN, 0.2, 0.1), name="fuzzed")
    order = "SO-fuzz"
    resp = await api.order(order, *BERLIN)
    assert (await resp.json())["driverId"] == driver.driver_id
    return Credentials(
        admin=api.settings.admin_token,
        driver_token=driver.token,
        driver_id=driver.driver_id,
        seller_order_id=order,
        inbound_secret=api.settings.inbound_secret,
    )


async def test_every_route_conforms_to_its_openapi_schema_under_fuzzing(
    start_api: Callable[[ResolvedSettings], Any],
    make_settings: Callable[..., ResolvedSettings],
    pg_pool: asyncpg.Pool,
    redis_client: Redis,
) -> None:
    # Random coordinates must not start a zone actor (a process) each: two zones at most.
    api: Api = await start_api(make_settings(max_zones=2))
    creds = await _seed(api)
    doc = await (await api.client.get("/openapi.json")).json()
    base_url = f"http://{api.client.host}:{api.client.port}"

    started = time.monotonic()
    tally = await asyncio.to_thread(run_fuzz, doc, base_url, creds)
    elapsed = time.monotonic() - started
    total = sum(tally.cases.values())
    print(
        f"\nFUZZ schemathesis: {total} cases over {len(tally.cases)} operation/mode pairs "
        f"in {elapsed:.1f} s; statuses {dict(sorted(tally.statuses.items()))}"
    )
    for name, n in sorted(tally.cases.items()):
        print(f"FUZZ   {n:3d}  {name}")
    assert tally.failures == [], "\n\n".join(tally.failures)
    assert 500 not in tally.statuses and 503 not in tally.statuses
