"""
Tasks of the bridge's tests, decorated with the bridge's ``@task``.

Importing this module needs neither Guillotina nor aio-pika: the worker
of ``tests.test_bridge_guillotina_live`` loads it with ``--tasks``.
"""

from quebert.bridge.guillotina import task


@task(name="bridge_test.touch", queue="bridge-test")
def touch(path: str, times: int = 1) -> dict:
    """Return what the task got, for the worker's record."""
    return {"path": path, "times": times}


@task(name="bridge_test.plain", queue="bridge-test")
def plain(value):
    """A second task, published by name through add_task."""
    return value
