"""
The state store's hot path to Redis: one prepared script call, written
straight to txredisapi's connection.

Every batch of state writes is the same ``EVALSHA`` with the same
arguments but one (the writes) and a flag.  txredisapi would look up its
connection through an ``inlineCallbacks`` generator, encode each argument
anew and start a reply timer for every call; on an idle worker, where a
batch is one write, that cost as much CPU as the round trip itself.  So
the call is encoded once, around its one variable argument, and written
to the connected protocol the way txredisapi's ``execute_command`` does:
the command to the transport, then a place in the protocol's reply queue,
so that replies stay matched to calls in order with every other command
on the connection.  txredisapi's reply timeout is kept, with one timer
for all such calls (:class:`Sender`).

When the connection is not up (or txredisapi's internals are not what
this module knows), :func:`connected` answers ``None`` and the caller takes
txredisapi's public path, which waits for a connection.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger(namespace="quebert.state.redis")


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class PreparedCall:
    """
    A command of ``len(head) + 2 + len(tail)`` arguments whose arguments
    are fixed but for two in a row: a variable one (any text), then a flag
    (``"1"`` or ``"0"``).
    """

    def __init__(self, head: Sequence[str], tail: Sequence[str]) -> None:
        count = len(head) + 2 + len(tail)
        self._head = b"*%d\r\n" % count + b"".join(bulk(a.encode()) for a in head)
        self._tail = {flag: bulk(b"1" if flag else b"0") + b"".join(bulk(a.encode())
                                                                    for a in tail)
                      for flag in (True, False)}

    def command(self, variable: str, flag: bool) -> bytes:
        """The command's bytes, as txredisapi would encode them."""
        value = variable.encode("utf-8")
        return b"%s$%d\r\n%s\r\n%s" % (self._head, len(value), value, self._tail[flag])


def connected(handler: Any) -> Optional[Any]:
    """
    The protocol of ``handler``'s connection (a txredisapi
    ``ConnectionHandler`` of one connection), if it is connected and taking
    plain commands (no WATCH or MULTI open, not pipelining); else ``None``.
    """
    try:
        pending = handler._factory.connectionQueue.pending
        if len(pending) != 1:
            return None
        protocol = pending[0]
        if (protocol.connected and not protocol.inTransaction and not protocol.inMulti
                and not protocol.pipelining and protocol.transport is not None):
            return protocol
    except AttributeError:
        pass
    return None


class Sender:
    """
    Writes prepared commands to a connected protocol, and keeps
    txredisapi's reply timeout for them: a connection that leaves a command
    unanswered for the protocol's ``replyTimeout`` seconds is aborted (a
    partitioned or hung server: without it the connection would stay
    "connected" and every later batch would time out on it), so that
    txredisapi reconnects.  One timer for every command on its way, not
    one each.

    :param clock: ``IReactorTime`` for that timer.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        #: [deadline, protocol] of the commands on their way, oldest first;
        #: protocol None once answered
        self._waiting: deque = deque()
        self._timer: Any = None

    def send(self, protocol: Any, command: bytes) -> Deferred:
        """
        Write ``command`` on ``protocol``; a Deferred firing with its reply:
        the decoded value, or the error instance Redis answered with (a
        ``ResponseError`` is a value here, not a failure, as txredisapi's
        own queue hands it over).
        """
        protocol.transport.write(command)
        d = protocol.replyQueue.get()
        timeout = getattr(protocol, "replyTimeout", None)
        if timeout:
            entry = [self.clock.seconds() + timeout, protocol]
            self._waiting.append(entry)
            if self._timer is None:
                self._timer = self.clock.callLater(timeout, self._due)
            d.addBoth(self._answered, entry)
        return d

    def _answered(self, reply: Any, entry: list) -> Any:
        entry[1] = None
        waiting = self._waiting
        while waiting and waiting[0][1] is None:
            waiting.popleft()
        if not waiting and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return reply

    def _due(self) -> None:
        self._timer = None
        waiting, now = self._waiting, self.clock.seconds()
        while waiting:
            deadline, protocol = waiting[0]
            if protocol is None:
                waiting.popleft()
            elif deadline - now > 1e-9:
                self._timer = self.clock.callLater(deadline - now, self._due)
                return
            else:
                waiting.popleft()
                if protocol.transport is not None:
                    log.warn("Redis left a state write unanswered for {seconds:g} s:"
                             " dropping the connection", seconds=protocol.replyTimeout)
                    # its commands on their way fail with ConnectionError
                    protocol.transport.abortConnection()
