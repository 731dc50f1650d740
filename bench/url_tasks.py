"""
The thread-pool baseline of ``bench/bench_url.py``.

The worker under test imports this module (``--tasks bench.url_tasks``).
:func:`sleep` is a plain function, so the worker runs it in its thread
pool: a slow task written the blocking way, one thread per task in flight,
to set against a URL task that waits as long for its answer on the reactor.
"""

from __future__ import annotations

import time

from quebert import task

#: The task's registered name.
SLEEP = "bench.sleep"


@task(name=SLEEP)
def sleep(seconds: float = 0.1) -> None:
    """Block this thread for ``seconds``."""
    time.sleep(seconds)
