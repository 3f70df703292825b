"""The middleware every request passes: the door checks (body size, Host, cross-site writes,
protected reads, admission control), then metrics and the request's arrival time for its deadline.

A pure ASGI middleware rather than Starlette's `BaseHTTPMiddleware` (`@app.middleware("http")`),
which runs the app in a separate task behind memory streams: that cost ~1.5 ms of CPU on every
request, refusals included, and under overload the 503s alone took the cores (docs/evidence.md)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.deadline import mark_arrival
from service.errors import ApiError, error_response
from service.guards import OPEN_PATHS, check_request


class Observe:
    def __init__(self, app: ASGIApp, state, body_limit: int) -> None:
        self.app, self.state, self.body_limit = app, state, body_limit

    def refusal(self, request: Request) -> ApiError | None:
        """Why the request is refused before any route runs, or None."""
        settings = self.state.settings
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.body_limit:
            return ApiError(413, "request_too_large", f"request body of {length} bytes, limit {self.body_limit}")
        try:
            check_request(request, settings)
        except ApiError as exc:
            return exc
        if self.state.active_requests >= settings.max_in_flight and request.url.path not in OPEN_PATHS:
            # admission control: past this many requests in flight, new ones wait behind them in the
            # event loop before any queue bound can see them; refusing at the door keeps the admitted fast
            metrics.SHED.labels("admission", "in_flight").inc()
            busy = f"{self.state.active_requests} requests in flight, the limit is {settings.max_in_flight}"
            return ApiError(503, "overloaded", f"{busy}; retry shortly", {"Retry-After": "1"})
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refusal(Request(scope))
        if refused is not None:
            response = error_response(refused.status, refused.code, refused.message, refused.headers)
            await response(scope, receive, send)
            return
        start = time.perf_counter()
        mark_arrival()
        self.state.active_requests += 1
        metrics.IN_FLIGHT.inc()
        status = 500  # what an exception that escapes the app becomes (the outer error middleware)

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.state.active_requests -= 1
            metrics.IN_FLIGHT.dec()
            path = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(path, scope["method"], str(status)).inc()
            metrics.REQUEST_LATENCY.labels(path).observe(time.perf_counter() - start)
