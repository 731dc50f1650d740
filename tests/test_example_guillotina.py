"""
``examples/guillotina_app/run.sh`` works as its README says: a Guillotina 7
application under ``guillotina serve`` and a ``twistd amqp-worker``, run
as a user would but on a fresh vhost, a fresh Redis key prefix and a free
port, and checked on what it prints: a call task and a URL task calling
back into the application both run, their records show through
``@amqp-tasks``, a task cancelled with ``DELETE @amqp-tasks/{id}`` ends
``canceled``, permissions hold, a guillotina_amqp-format message runs, and
no credential is left in RabbitMQ or Redis.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests._example import free_port, listening, run_script
from tests._rabbit import make_vhost
from tests._redis import REDIS_URL, isolated_redis
from tests._worker import ROOT

SCRIPT = os.path.join(ROOT, "examples", "guillotina_app", "run.sh")
#: The script normally takes about 5 s; this bounds a hung run.
RUN_TIMEOUT = 150.0

EXPECTED = [
    "RESULT container: the container is created (ok)",
    "RESULT order: the order is accepted (ok)",
    "RESULT task-id: task ids have guillotina_amqp's form task:{db}-{container}-{uuid} (ok)",
    "RESULT receipt: the receipt task succeeded (ok)",
    "RESULT receipt-context: the task got the container and user as plain data (ok)",
    "RESULT shipping: the callback task succeeded (ok)",
    "RESULT callback-user: the callback ran as the service principal (ok)",
    "RESULT cancel: DELETE answers 200 (ok)",
    "RESULT canceled: the report ended canceled (ok)",
    "RESULT list: three tasks are listed (ok)",
    "RESULT anonymous: an anonymous caller is refused (ok)",
    "RESULT forged: only the workers may call the callback (ok)",
    "RESULT unknown: an unknown id is not found (ok)",
    "RESULT legacy: the legacy message ran (func resolved through an alias) (ok)",
    "RESULT secrets: no password, token or Authorization value stored (ok)",
]


class GuillotinaExampleTests(TestCase):
    timeout = 200

    async def test_run_sh(self) -> None:
        amqp_url = make_vhost(self, prefix="quebert-example")
        _redis, prefix = await isolated_redis(self)
        port = free_port()
        env = dict(AMQP_URL=amqp_url, REDIS_URL=REDIS_URL, STATE_PREFIX=prefix,
                   GUILLOTINA_PORT=str(port))
        status, text, _elapsed = await run_script(self, SCRIPT, env, RUN_TIMEOUT)
        self.assertEqual(status, 0, text[-6000:])
        results = [line for line in text.splitlines() if line.startswith("RESULT ")]
        self.assertEqual(results, EXPECTED, text[-6000:])
        self.assertIn("ALL CHECKS PASSED", text)
        # the record of the URL task holds the callback's answer, not a credential
        self.assertIn('\\"called_by\\":\\"quebert-service\\"', text)
        self.assertNotIn("Bearer", text)
        self.assertFalse(listening(port), "the application still listens")
