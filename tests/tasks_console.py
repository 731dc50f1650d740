"""Tasks for the console's browser tests (tests/test_console_browser.py)."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor

from quebert import task


@task(name="console.square")
def square(x: int) -> int:
    return x * x


@task(name="console.echo")
def echo(*args: object, **kwargs: object) -> dict:
    return {"args": list(args), "kwargs": kwargs}


@task(name="console.sleep")
async def sleep(seconds: float) -> float:
    d: defer.Deferred = defer.Deferred()
    call = reactor.callLater(seconds, d.callback, seconds)
    try:
        return await d
    finally:
        if call.active():
            call.cancel()


@task(name="console.fails_once", max_attempts=1)
def fails_once(path: str) -> str:
    """Fails for good the first time (leaving ``path``), succeeds once requeued."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("failed once\n")
        raise RuntimeError("planned failure: requeue me")
    return "succeeded after a requeue"
