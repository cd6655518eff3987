"""The ingress's HTTP/1 server: aiohttp's, with RFC 9457 parser errors, no request bytes
in its logs, and a deadline on reading each request head (slowloris)."""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    ContentLengthError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    TransferEncodingError,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from dispatcher.api.keys import SETTINGS
from dispatcher.api.problems import PROBLEM_JSON, problem_response
from dispatcher.errors import PROBLEM_BASE, RequestTimeoutError

log = logging.getLogger(__name__)

# What the parser's exceptions mean, in words of our own: their messages quote the
# offending bytes (a header line may hold a bearer token), so neither the answer nor
# the log ever carries them. Most specific first.
PARSER_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (LineTooLong, "a request line or header field is too long"),
    (InvalidURLError, "the request target is not a valid URL"),
    (BadStatusLine, "the request line is malformed"),
    (InvalidHeader, "a header field is malformed"),
    (TransferEncodingError, "the chunked body framing is malformed"),
    (ContentLengthError, "the body does not match its Content-Length"),
    (BadHttpMessage, "the HTTP request is malformed"),
)


def parser_error_detail(exc: BaseException | None) -> str:
    """A fixed sentence naming what was wrong, never quoting the request."""
    for kind, detail in PARSER_ERRORS:
        if isinstance(exc, kind):
            return detail
    return "the HTTP request is malformed"


def _raw_problem(status: int, type_code: str, title: str, detail: str) -> bytes:
    """A complete HTTP/1.1 answer, for a connection that never produced a request."""
    body = json.dumps(
        {
            "type": PROBLEM_BASE + type_code,
            "title": title,
            "status": status,
            "detail": detail,
        }
    ).encode()
    head = (
        f"HTTP/1.1 {status} {title}\r\nContent-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ProblemRequestHandler(RequestHandler):
    """aiohttp's protocol with two changes.

    - Errors raised before a request reaches the app (the parser's 400s, a handler
      crash outside the middleware) are answered with a problem document that quotes
      nothing, and logged by exception class only.
    - A request head (request line and headers) must arrive in full within
      `head_timeout_s` of its first byte; else the connection gets 408 and is closed.
      Idle keep-alive connections are bounded by aiohttp's own `keepalive_timeout`.
    """

    def __init__(
        self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # Between requests (none running, none queued), arriving bytes start a head.
        starts_head = not self._request_in_progress and not self._messages
        super().data_received(data)
        if self._messages or self._force_close or self._close:
            self._stop_head_timer()
        elif starts_head and self._head_timer is None and data:
            self._head_timer = self._loop.call_later(
                self._head_timeout_s, self._head_timed_out
            )

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._messages or self._request_in_progress:
            return
        log.info(
            "closed a connection whose request head took longer than %s s",
            self._head_timeout_s,
        )
        self.transport.write(
            _raw_problem(
                RequestTimeoutError.status,
                RequestTimeoutError.code,
                RequestTimeoutError.title,
                "the request head was not received in time",
            )
        )
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # A bug, not the client's doing: the traceback is ours to read.
            log.error("unhandled error outside the app", exc_info=exc)
            detail = "an unexpected error occurred; it was logged"
        else:
            detail = parser_error_detail(exc)
            log.debug("refused a malformed request: %s", type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was already started; cannot send an error")
        response = problem_response(status, _title(status), detail)
        response.force_close()
        return response


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class ProblemServer(web.Server):
    """A web.Server whose connections use ProblemRequestHandler."""

    def __init__(self, handler: Any, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.head_timeout_s = head_timeout_s

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(
            self, loop=self._loop, head_timeout_s=self.head_timeout_s, **self._kwargs
        )


class IngressRunner(web.AppRunner):
    """web.AppRunner for create_app's application: same app, ProblemServer connections.

    `dispatcher serve` and the tests both run the ingress through it. A client that
    goes away does not cancel its handler (aiohttp's default, which its TestServer
    turns off): a booking under way completes, and the sender's retry gets the replay.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs["handler_cancellation"] = False
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()
        # aiohttp builds its Server inside Application._make_handler; rebuild it with
        # the same handler, request factory and keyword arguments.
        return ProblemServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            head_timeout_s=self.app[SETTINGS].http_head_timeout_s,
            **plain._kwargs,
        )
