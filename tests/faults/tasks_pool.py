"""
The fault suite's process-pool task (``tests/faults/test_pool_children.py``).

In a module of its own: a worker starts a process pool when one of its
``--tasks`` modules registers an ``executor="process"`` task, and the other
scenarios' workers must not pay for one (a slower restart changes what
they measure).
"""

from __future__ import annotations

from quebert import task
from tests.faults.tasks import record_run


@task(name="faults.pmark", executor="process", min_backoff=0.1, max_backoff=0.5,
      max_attempts=-1)
def pmark(path: str, i: int, spin: int = 0) -> int:
    """
    The process-pool twin of :func:`mark`: a pure-Python loop of ``spin``
    steps (CPU work in a pool process), then the run recorded.  Retried
    without limit: a scenario kills the processes running it.
    """
    total = 0
    for step in range(spin):
        total += step % 7
    record_run(path, i)
    return i
