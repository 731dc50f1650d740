# -*- test-case-name: tests.test_process -*-
"""
Process workers: ``@task(executor="process")`` runs in a pool of child
processes the worker owns, built on ampoule (an AMP process pool).

* :mod:`quebert.process.pool`: the worker's side (children kept at full
  size, timeouts and cancellations that kill, lost children reported);
* :mod:`quebert.process.child`: a child's side (runs registered tasks only);
* :mod:`quebert.process.commands`: the AMP commands between them (JSON);
* :mod:`quebert.process.remote`: a child's exception raised in the worker.
"""

from quebert.process.pool import TaskProcessPool, default_size

__all__ = ["TaskProcessPool", "default_size"]
