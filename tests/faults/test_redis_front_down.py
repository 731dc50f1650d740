"""
Scenario: Redis behind a proxy or load balancer, down for 10 s mid-batch.

The same batch, workers and checks as ``redis-outage``
(:mod:`tests.faults.test_redis_outage`), but the proxy keeps listening:
it aborts the open connections, then accepts each new one and closes it
at once, as HAProxy, Envoy or a Kubernetes service in front of a Redis
that is down do.  The workers' reconnections are made, and lost during
their ``SELECT``: txredisapi alone then stopped reconnecting for good,
and the workers never wrote to Redis again (their records stayed
``running`` after the batch had run).  Each worker must keep trying,
reconnect once the backend is back and replay its queued writes.
"""

from __future__ import annotations

from tests.faults import test_redis_outage


class RedisFrontDownTests(test_redis_outage.RedisOutageTests):
    scenario = "redis-front-down"
    fault = (f"Redis behind a proxy, down for {test_redis_outage.DOWN:.0f} s mid-batch "
             "(connections reset, new ones accepted and closed)")
    refuse = False
