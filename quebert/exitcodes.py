"""
Exit statuses of ``twistd amqp-worker`` (see "Exit status" in docs/operations.rst).

A module of their own, below everything that exits with them (the worker
service, the reactor-stall watchdog, the liveness beacon), so that none of
those imports another for a number.
"""

#: Stopped by SIGTERM/SIGINT after the graceful drain.
EXIT_OK = 0
#: Bad command line or config file, or another error at startup.
EXIT_USAGE = 1
#: RabbitMQ refused the worker's setup for good (403, 406, 530).
EXIT_BROKER_REFUSED = 3
#: The reactor-stall watchdog (``--auto-kill-timeout``) killed the worker.
EXIT_REACTOR_STALLED = 4
#: An AMQP connection is stuck: the liveness beacon got no answer, even after
#: reconnecting.
EXIT_STUCK_CONNECTION = 5
#: A second SIGTERM/SIGINT during the drain stops at once: the process then
#: dies of that signal (status 128 + N, 143 for SIGTERM, 130 for SIGINT), as
#: any program a signal interrupts.  A third one exits at once with that status.
EXIT_SIGNAL_BASE = 128
