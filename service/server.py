"""The HTTP server: uvicorn, with a deadline on reading a request's headers.

Why: uvicorn's keep-alive timer starts only after a first response, and any byte received cancels
it, so a client that connects and sends nothing, or dribbles a header line every few seconds
(slowloris), held a connection and its memory forever. Here every connection must have sent a whole
request head within `EMKUM_HEADER_TIMEOUT_S` of connecting or of its previous response, or it is
closed; `EMKUM_MAX_CONNECTIONS` bounds how many are open at once (uvicorn answers 503 beyond it)."""

from __future__ import annotations

import asyncio

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


class HeaderDeadlineProtocol(H11Protocol):
    header_timeout_s: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.responses = 0  # on this connection
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.responses += 1
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self.loop.call_later(self.header_timeout_s, self._header_deadline, self.responses)

    def _header_deadline(self, responses_then: int) -> None:
        # h11 stays IDLE until a whole request head has arrived: still IDLE, with no response on this
        # connection since the deadline was armed, means the client never finished a request in time
        waiting = self.conn.their_state is h11.IDLE and self.responses == responses_then
        if waiting and not self.transport.is_closing():
            self.transport.close()


def serve(app, settings: Settings) -> None:
    protocol = type("Protocol", (HeaderDeadlineProtocol,), {"header_timeout_s": settings.header_timeout_s})
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=protocol,
        timeout_keep_alive=settings.idle_timeout_s,
        limit_concurrency=settings.max_connections,
    )
