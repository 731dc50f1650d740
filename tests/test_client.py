"""
Unit tests of quebert.Client's checks, made before anything is published:
no broker is needed (the client never connects).
"""

from __future__ import annotations

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from quebert import Client
from quebert.errors import ConfigurationError, InvalidMessage
from quebert.state import MemoryStateManager

#: Line ends a regex ``$`` also matches before (``\n``), and one it does not.
LINE_ENDS = ("\n", "\r\n")

#: Nothing listens there: a test that reached the network would fail.
NOWHERE = "amqp://guest:guest@127.0.0.1:1/"


class LineEndTests(SynchronousTestCase):
    """Queue names, ids and names ending in a line end are refused at the call."""

    def setUp(self) -> None:
        self.client = Client(NOWHERE, reactor=Clock(), state=MemoryStateManager(clock=Clock()))

    def tearDown(self) -> None:
        self.assertFalse(self.client.broker.running)

    def test_add_task(self) -> None:
        for end in LINE_ENDS:
            for options, field in (({"_queue": "q" + end}, "queue"),
                                   ({"_task_id": "abc" + end}, "id"),
                                   ({"_name": "nightly" + end}, "name")):
                e = self.assertRaises(InvalidMessage, self.client.add_task, "app.add", 1,
                                      **options)
                self.assertEqual(e.field, field)
            e = self.assertRaises(InvalidMessage, self.client.add_task, "app.add" + end)
            self.assertEqual(e.field, "task")

    def test_add_url_task(self) -> None:
        for end in LINE_ENDS:
            for options, field in (({"queue": "q" + end}, "queue"),
                                   ({"task_id": "abc" + end}, "id"),
                                   ({"headers": {"X-Request-Source" + end: "billing"}},
                                    "headers.X-Request-Source" + end)):
                e = self.assertRaises(InvalidMessage, self.client.add_url_task,
                                      "https://example.com/hook", **options)
                self.assertEqual(e.field, field)

    def test_pause_and_resume(self) -> None:
        for end in LINE_ENDS:
            for method in (self.client.pause, self.client.resume):
                failure = self.failureResultOf(ensureDeferred(method("q" + end)),
                                               ConfigurationError)
                self.assertIn(repr("q" + end), str(failure.value))
        self.assertEqual(self.successResultOf(self.client.state.paused_queues()), set())

    def test_default_queue(self) -> None:
        for end in LINE_ENDS:
            e = self.assertRaises(ConfigurationError, Client, NOWHERE, reactor=Clock(),
                                  default_queue="default" + end)
            self.assertIn(repr("default" + end), str(e))
