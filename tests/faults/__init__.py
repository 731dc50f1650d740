"""
The fault suite (issue 4): real workers, the real RabbitMQ and Redis, and
a fault injected mid-batch.  See docs/reliability.rst.

It runs apart from the rest (``scripts/run-tests.sh`` runs it after the
normal suite, in its own trial process): one scenario stops RabbitMQ and
would break any test running at the same time.
"""
