"""Domain errors; each carries its HTTP status and becomes an RFC 9457 problem."""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://dispatcher.dev/problems/"


class DispatchError(Exception):
    """Base of every error the API answers with a problem document."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.retry_after_s = retry_after_s

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.code


class BadRequestError(DispatchError):
    """The request's framing is broken (the HTTP parser refused it)."""

    status = 400
    code = "bad-request"
    title = "Bad request"


class PayloadTooLargeError(DispatchError):
    status = 413
    code = "payload-too-large"
    title = "Payload too large"


class RequestTimeoutError(DispatchError):
    """The client sent its body too slowly (slowloris); the connection is closed."""

    status = 408
    code = "request-timeout"
    title = "Request timeout"


class ClientClosedError(DispatchError):
    """The client went away before its request was read: nobody reads the answer, and
    it is no server error (counted as 499, nginx's "client closed request")."""

    status = 499
    code = "client-closed-request"
    title = "Client closed request"


class RequestValidationError(DispatchError):
    status = 422
    code = "validation-error"
    title = "Request validation failed"


class UnauthorizedError(DispatchError):
    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class ForbiddenError(DispatchError):
    status = 403
    code = "forbidden"
    title = "Forbidden"


class NotFoundError(DispatchError):
    status = 404
    code = "not-found"
    title = "Not found"


class UpgradeRequiredError(DispatchError):
    """A plain GET on a WebSocket route."""

    status = 426
    code = "upgrade-required"
    title = "Upgrade Required"


class ConflictError(DispatchError):
    status = 409
    code = "conflict"
    title = "Conflict"


class TooManyRequestsError(DispatchError):
    status = 429
    code = "too-many-requests"
    title = "Too many requests"


class ServiceUnavailableError(DispatchError):
    """A dependency (PostgreSQL, a zone actor) cannot answer now; retrying is safe."""

    status = 503
    code = "service-unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after_s: int = 2) -> None:
        super().__init__(detail, retry_after_s=retry_after_s)


class DatabaseUnavailableError(ServiceUnavailableError):
    code = "database-unavailable"
    title = "Database unavailable"


class ZoneUnavailableError(ServiceUnavailableError):
    code = "zone-unavailable"
    title = "Zone unavailable"


class StaleEpochError(Exception):
    """A zone actor incarnation lost its fencing token: a newer one owns the zone."""
