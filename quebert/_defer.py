"""
Waiting on Deferreds we must never cancel.

pika leaves a channel broken when one of its Deferreds is cancelled, and
txredisapi re-fires cancelled commands; so anything that may time out or be
cancelled waits on a Deferred of our own that *follows* theirs.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure


def mirror(d: defer.Deferred) -> defer.Deferred:
    """
    A Deferred of our own with ``d``'s outcome; cancelling it leaves ``d``
    alone.  A failure is handed over, not kept in ``d`` as well (where it
    would be logged as unhandled when ``d`` is collected).
    """
    ours: defer.Deferred = defer.Deferred()

    def forward(result: Any) -> Any:
        if isinstance(result, Failure):
            if not ours.called:
                ours.errback(result)
            return None
        if not ours.called:
            ours.callback(result)
        return result

    d.addBoth(forward)
    return ours


def bounded(d: defer.Deferred, seconds: float, clock: Any,
            on_timeout: Optional[Callable[[], Exception]] = None) -> defer.Deferred:
    """
    A Deferred of our own with ``d``'s outcome, or, after ``seconds``, the
    error ``on_timeout()`` makes (``None``: fire ``None`` instead).  ``d`` is
    never cancelled; its late outcome is dropped.  Cancelling the returned
    Deferred stops the timer.
    """
    def cancel(_: defer.Deferred) -> None:
        if timer.active():
            timer.cancel()

    ours: defer.Deferred = defer.Deferred(cancel)

    def expire() -> None:
        if ours.called:
            return
        if on_timeout is None:
            ours.callback(None)
        else:
            ours.errback(on_timeout())

    timer = clock.callLater(seconds, expire)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if not ours.called:
            if isinstance(result, Failure):
                ours.errback(result)
            else:
                ours.callback(result)

    d.addBoth(settle)
    return ours


class Shared:
    """
    One operation that many callers wait for, each on a Deferred of its own.

    The waiters are fired one after the other in a loop, never from inside
    one another's callbacks: thousands of publishes waiting for one queue
    declaration must not grow the stack (``DeferredLock`` hands itself from
    waiter to waiter recursively, which overflows the stack mid-frame).
    """

    def __init__(self, d: defer.Deferred) -> None:
        self._waiters: list = []
        self._result: Any = None
        self.done = False
        d.addBoth(self._fire)

    def wait(self) -> defer.Deferred:
        """A Deferred of its own with the operation's outcome."""
        ours: defer.Deferred = defer.Deferred()
        if self.done:
            self._settle(ours, self._result)
        else:
            self._waiters.append(ours)
        return ours

    @staticmethod
    def _settle(waiter: defer.Deferred, result: Any) -> None:
        if waiter.called:
            return
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)

    def _fire(self, result: Any) -> None:
        self.done = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._settle(waiter, result)
        return None
