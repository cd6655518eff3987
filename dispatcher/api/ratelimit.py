"""Per-driver ping rate limit: a token bucket per driver id, bounded in memory."""

from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from dispatcher.api.keys import SETTINGS
from dispatcher.errors import TooManyRequestsError

# Most buckets kept at once. Idle buckets are dropped long before this in practice
# (see TokenBuckets); the cap only bounds memory against a flood of distinct ids.
MAX_BUCKETS: Final = 100_000
# Driver ids are short; a longer key (an operator can put anything in a path) is kept
# as its digest, so a bucket costs a few hundred bytes whatever the key.
MAX_KEY_CHARS: Final = 64


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per key: `burst` tokens, refilled at `rate_per_s`.

    A bucket that has refilled to full behaves exactly like no bucket, so buckets not
    touched for `burst / rate_per_s` seconds are dropped (least recently used first,
    in O(1) amortised per call). Past `max_buckets` the least recently used bucket is
    dropped even if not full: that key gets a fresh burst, lenient but never unfair to
    an honest client. A rate or a burst of 0 turns the limit off.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_buckets: int = MAX_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rate_per_s >= 0 or math.isinf(rate_per_s) or burst < 0:
            raise ValueError("rate must be finite and >= 0, burst >= 0")
        if max_buckets < 1:
            raise ValueError("max_buckets must be >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._refill_s = burst / rate_per_s if self.enabled else 0.0

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 if allowed, else seconds until one is available."""
        if not self.enabled:
            return 0.0
        if len(key) > MAX_KEY_CHARS:
            key = hashlib.blake2b(
                key.encode(errors="surrogatepass"), digest_size=16
            ).hexdigest()
        now = self._clock()
        # Evict first: the key's own bucket may go too, if it has refilled to full.
        self._evict(now, adding=key not in self._buckets)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
            self._buckets[key] = bucket
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(
                float(self.burst), bucket.tokens + elapsed * self.rate_per_s
            )
            bucket.updated = now
            self._buckets.move_to_end(key)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _evict(self, now: float, *, adding: bool) -> None:
        while self._buckets:
            key, oldest = next(iter(self._buckets.items()))
            idle = now - oldest.updated >= self._refill_s
            full = adding and len(self._buckets) >= self._max_buckets
            if not (idle or full):
                return
            del self._buckets[key]


def retry_after_s(wait_s: float) -> int:
    """`Retry-After` is whole seconds; never 0, so a client does not spin."""
    return max(1, math.ceil(wait_s))


# One limiter per application, made on first use from its settings; weak keys let an
# app (tests start many) go away with its buckets.
_LIMITERS: weakref.WeakKeyDictionary[web.Application, TokenBuckets] = (
    weakref.WeakKeyDictionary()
)


def ping_limiter(app: web.Application) -> TokenBuckets:
    limiter = _LIMITERS.get(app)
    if limiter is None:
        settings = app[SETTINGS]
        limiter = TokenBuckets(settings.ping_rate_per_s, settings.ping_burst)
        _LIMITERS[app] = limiter
    return limiter


def rate_limited_detail(limiter: TokenBuckets, wait_s: float) -> str:
    return (
        f"rate limited: more than {limiter.rate_per_s:g} pings/s (burst {limiter.burst}) "
        f"for this driver; retry after {retry_after_s(wait_s)} s"
    )


def check_ping_rate(request: web.Request, driver_id: str) -> None:
    """Take a token for `driver_id`; raise 429 with `Retry-After` when there is none."""
    limiter = ping_limiter(request.app)
    wait = limiter.take(driver_id)
    if wait > 0:
        raise TooManyRequestsError(
            rate_limited_detail(limiter, wait), retry_after_s=retry_after_s(wait)
        )
