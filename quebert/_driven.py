# -*- test-case-name: tests.test_mediator.DrivenTests -*-
"""
:class:`Driven`: the mediator's own ``ensureDeferred``, for the hot path.

Each delivery's ``handle()`` coroutine runs in one of these rather than in
``defer.ensureDeferred``: less machinery per delivery and per resumption,
and one :mod:`contextvars` context per delivery (where the mediator sets
the running task for :func:`quebert.current_task`).
"""

from __future__ import annotations

import contextvars
import inspect
from typing import Any, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["Driven"]

_NOTHING = object()


class Driven:
    """
    Runs one coroutine like ``defer.ensureDeferred`` does: each awaited
    Deferred's result is sent (a failure thrown) into the coroutine, every
    step runs in one ``contextvars`` context of its own, and ``deferred``
    fires with the coroutine's outcome.  Cancelling ``deferred`` cancels
    the Deferred the coroutine waits on.
    """

    __slots__ = ("coro", "context", "deferred", "waiting_on", "_inside", "_early")

    def __init__(self, coro: Any) -> None:
        self.coro = coro
        self.context = contextvars.copy_context()
        self.deferred: defer.Deferred = defer.Deferred(self._cancel)
        self.waiting_on: Optional[defer.Deferred] = None
        self._inside = False
        self._early: Any = _NOTHING
        self._step(None)

    def _cancel(self, _: defer.Deferred) -> None:
        waiting_on = self.waiting_on
        if waiting_on is not None:
            waiting_on.cancel()

    def _step(self, result: Any) -> None:
        coro, run = self.coro, self.context.run
        while True:
            try:
                if isinstance(result, Failure):
                    yielded = run(result.throwExceptionIntoGenerator, coro)
                else:
                    yielded = run(coro.send, result)
            except StopIteration as e:
                if not self.deferred.called:
                    self.deferred.callback(e.value)
                return
            except BaseException:
                failure = Failure()
                if not self.deferred.called:
                    self.deferred.errback(failure)
                return
            if not isinstance(yielded, defer.Deferred):
                if inspect.iscoroutine(yielded) or inspect.isgenerator(yielded):
                    yielded = defer.Deferred.fromCoroutine(yielded)
                else:  # as inlineCallbacks does
                    result = yielded
                    continue
            self._inside = True
            yielded.addBoth(self._resumed)
            self._inside = False
            result, self._early = self._early, _NOTHING
            if result is _NOTHING:
                self.waiting_on = yielded
                return
            # fired at once: go on here rather than recurse

    def _resumed(self, result: Any) -> None:
        if self._inside:
            self._early = result
        else:
            self.waiting_on = None
            self._step(result)
        return None
