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
on the connection.

When the connection is not up (or txredisapi's internals are not what
this module knows), :func:`connected` answers ``None`` and the caller takes
txredisapi's public path, which waits for a connection.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from twisted.internet.defer import Deferred


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
    plain commands (not in a transaction, not pipelining); else ``None``.
    """
    try:
        pending = handler._factory.connectionQueue.pending
        if len(pending) != 1:
            return None
        protocol = pending[0]
        if (protocol.connected and not protocol.inTransaction and not protocol.pipelining
                and protocol.transport is not None):
            return protocol
    except AttributeError:
        pass
    return None


def send(protocol: Any, command: bytes) -> Deferred:
    """
    Write ``command`` on ``protocol`` and return a Deferred firing with its
    reply: the decoded value, or the error instance Redis answered with (a
    ``ResponseError`` is a value here, not a failure, as txredisapi's own
    queue hands it over).
    """
    protocol.transport.write(command)
    return protocol.replyQueue.get()
