"""TCP settings of quebert's client connections."""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> bool:
    """
    Turn Nagle's algorithm off on ``transport`` (TCP, or TLS over TCP),
    and say whether it could be.

    quebert's connections carry small requests that are answered at once
    and often several on their way together: a state batch sent while the
    one before is unanswered, acks while deliveries arrive.  With Nagle on
    (Twisted's default), such a write waits for the peer's acknowledgement
    of the one before it: up to a delayed ACK (40 ms on Linux) per task
    started, seen as p99 start latencies of tens of ms.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return False
    try:
        set_no_delay(True)
    except Exception:  # not a socket this can be set on (a UNIX socket, a test transport)
        return False
    return True


class NoDelayProtocol:
    """A mixin for a client protocol class: :func:`no_delay` once connected."""

    transport: Any

    def connectionMade(self) -> Any:
        no_delay(self.transport)
        return super().connectionMade()  # type: ignore[misc]
