"""Connection-level limits under uvicorn's h11 protocol: silent or slow clients can't hold the server.

- every request must arrive in time: its headers within `header_timeout` seconds of the connection
  opening (or of the previous response ending, on a kept-alive connection), its whole body within
  `body_timeout` seconds of the headers; a client that trickles bytes is closed at the deadline.
- at most `max_connections` open connections; at the limit, a new connection closes the oldest one
  still waiting for its request (idle and half-sent requests hold no work), so idle sockets can
  never lock real clients out. Only when every connection is busy is the newcomer refused with 503.

uvicorn's own `limit_concurrency` is not used: it counts idle connections against the limit, which
let a few hundred silent sockets answer 503 to everyone, /health included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

_BUSY_BODY = b'{"error": {"message": "server busy: too many connections; retry shortly", "type": "server_busy"}}'
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass
class Guard:
    """Settings and the open connections of one server (shared by its protocol instances)."""
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 512
    open: set = field(default_factory=set)

    def protocol(self) -> type:
        """The protocol class to give uvicorn (`uvicorn.Config(http=...)`)."""
        return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": self})

    def make_room(self, newcomer) -> bool:
        """Close the longest-waiting connection without a request in progress; False if all are busy."""
        waiting = [p for p in self.open if p is not newcomer and p.phase == "headers"]
        if not waiting:
            return False
        min(waiting, key=lambda p: p.phase_since).expire()
        return True


class GuardedH11Protocol(H11Protocol):
    guard: Guard  # set on the subclass made by Guard.protocol()

    phase = "headers"  # "headers": waiting for a request; "body": reading one; "app": request read
    phase_since = 0.0
    _deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.guard.open.add(self)
        self._enter("headers")
        if len(self.guard.open) > self.guard.max_connections and not self.guard.make_room(self):
            transport.write(BUSY)
            self.expire()

    def connection_lost(self, exc) -> None:
        self.guard.open.discard(self)
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def _follow(self) -> None:
        """Track where the request being read stands (h11's view of the client)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            self._enter("headers")
        elif state is h11.SEND_BODY:
            self._enter("body")
        else:  # the whole request is in (DONE), or the connection is ending
            self._enter("app")

    def _enter(self, phase: str) -> None:
        if phase == self.phase and (self._deadline is not None or phase == "app"):
            return  # a deadline runs from the start of its phase, not from the last byte
        self._cancel()
        self.phase, self.phase_since = phase, time.monotonic()
        limit = {"headers": self.guard.header_timeout, "body": self.guard.body_timeout}.get(phase)
        if limit is not None:
            self._deadline = self.loop.call_later(limit, self.expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def expire(self) -> None:
        """Close this connection (deadline passed, or room needed); a request being read sees a disconnect."""
        self._cancel()
        if not self.transport.is_closing():
            self.transport.close()
