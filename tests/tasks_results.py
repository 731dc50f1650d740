"""Tasks for the results tests (tests/test_results.py), run by real workers."""

from __future__ import annotations

from twisted.internet import defer, reactor

from quebert import Reject, task


@task(name="res.square")
def square(x: int) -> dict:
    return {"x": x, "square": x * x}


@task(name="res.returns_set")
def returns_set() -> set:
    return {1, 2}


@task(name="res.refuse")
def refuse(why: str) -> None:
    raise Reject(why)


@task(name="res.sleep")
async def sleep(seconds: float) -> float:
    d: defer.Deferred = defer.Deferred()
    call = reactor.callLater(seconds, d.callback, seconds)
    try:
        return await d
    finally:
        if call.active():
            call.cancel()
