# -*- test-case-name: tests.test_url_integration -*-
"""
``twistd quebert-api``: the HTTP task API on its own, for producers that
push over HTTP without running a worker in the same process.

It takes the worker's options (``--config``, ``--amqp-url``,
``--redis-url``, ``--queue`` for the queues ``GET /queues`` reports,
``--tasks`` to check call tasks against a registry) and needs
``--http-port``.
"""

from __future__ import annotations

from twisted.python import usage

from quebert import tap
from quebert.errors import ConfigurationError


class Options(tap.Options):
    longdesc = ("Serve the quebert HTTP task API (push, inspect, cancel, requeue tasks; "
                "pause and resume queues) without running tasks.")
    sends_url_tasks = False  # it never needs the workers' service tokens

    def postOptions(self) -> None:
        super().postOptions()
        if self["worker_config"].http_port is None:
            raise usage.UsageError("--http-port is required")


def makeService(options: Options):
    """Build the API service for ``twistd``."""
    from quebert.worker import ApiService

    try:
        return ApiService(options["worker_config"])
    except ConfigurationError as e:
        raise usage.UsageError(str(e))
