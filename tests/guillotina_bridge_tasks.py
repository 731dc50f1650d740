"""
Tasks of the bridge's tests, decorated with the bridge's ``@task``.

Importing this module needs neither Guillotina nor aio-pika: the worker
of ``tests.test_bridge_guillotina_live`` loads it with ``--tasks``.  Nor
does it import the reactor: the Guillotina application imports it too.
"""

from twisted.internet.task import deferLater

from quebert import current_task
from quebert.bridge.guillotina import task


@task(name="bridge_test.touch", queue="bridge-test")
def touch(path: str, times: int = 1) -> dict:
    """Return what the task got, for the worker's record."""
    return {"path": path, "times": times}


@task(name="bridge_test.plain", queue="bridge-test")
def plain(value):
    """A second task, published by name through add_task."""
    return value


@task(name="bridge_test.slow", queue="bridge-test")
async def slow(seconds: float) -> dict:
    """Sleep on the reactor (to be cancelled), then say where it came from."""
    from twisted.internet import reactor

    await deferLater(reactor, seconds, lambda: None)
    return dict(current_task().context)
