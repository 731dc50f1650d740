"""
Tests for quebert.dispatch.settings: the connection limits of a worker's
URL dispatcher follow its concurrency unless configured, and a configured
limit below that concurrency is said in words.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from quebert.dispatch import DispatchSettings
from quebert.dispatch.settings import DEFAULT_MAX_CONNECTIONS


class ConnectionLimitsTests(SynchronousTestCase):
    def test_unset_limits_follow_the_worker_concurrency(self):
        settings = DispatchSettings.from_config({})
        self.assertEqual((settings.max_connections, settings.max_connections_per_host),
                         (None, None))
        self.assertEqual(settings.connection_limits(500), (500, 500))
        self.assertEqual(settings.connection_limits(7), (7, 7))

    def test_without_a_concurrency_the_library_default(self):
        self.assertEqual(DispatchSettings().connection_limits(),
                         (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS))

    def test_configured_limits_are_kept(self):
        settings = DispatchSettings.from_config({"max_connections": 50,
                                                 "max_connections_per_host": 4})
        self.assertEqual(settings.connection_limits(500), (50, 4))
        self.assertEqual(settings.connection_limits(2), (50, 4))

    def test_per_host_follows_a_configured_total(self):
        settings = DispatchSettings.from_config({"max_connections": 50})
        self.assertEqual(settings.connection_limits(500), (50, 50))
        settings = DispatchSettings.from_config({"max_connections_per_host": 10})
        self.assertEqual(settings.connection_limits(500), (500, 10))

    def test_the_dispatcher_gets_them(self):
        dispatcher = DispatchSettings.from_config({"max_connections_per_host": 3}).dispatcher(
            object(), agent=object(), concurrency=40)
        self.assertEqual((dispatcher.max_connections, dispatcher.max_connections_per_host),
                         (40, 3))


class CappedConcurrencyTests(SynchronousTestCase):
    """What the worker says at start-up about limits below its concurrency."""

    def test_defaults_cap_nothing(self):
        self.assertEqual(DispatchSettings().capped_concurrency(500, "--max-running-tasks 500"),
                         [])

    def test_limits_at_or_above_the_concurrency_cap_nothing(self):
        settings = DispatchSettings.from_config({"max_connections": 500,
                                                 "max_connections_per_host": 500})
        self.assertEqual(settings.capped_concurrency(500, "x"), [])
        self.assertEqual(settings.capped_concurrency(100, "x"), [])

    def test_per_host_limit_below_names_both_numbers_and_the_key(self):
        settings = DispatchSettings.from_config({"max_connections_per_host": 10})
        [sentence] = settings.capped_concurrency(500, "--max-running-tasks 500")
        self.assertIn("at most 10 requests are sent at once to one host", sentence)
        self.assertIn("fewer than the 500 tasks this worker runs at once "
                      "(--max-running-tasks 500)", sentence)
        self.assertIn('Raise "max_connections_per_host" in the config file\'s "dispatch" block',
                      sentence)

    def test_total_limit_below_is_said_and_caps_the_per_host_comparison(self):
        settings = DispatchSettings.from_config({"max_connections": 100,
                                                 "max_connections_per_host": 10})
        total, per_host = settings.capped_concurrency(500, "--max-running-tasks 500")
        self.assertIn("at most 100 requests are sent at once (dispatch.max_connections)", total)
        self.assertIn('Raise "max_connections"', total)
        self.assertIn("at most 10 requests are sent at once to one host", per_host)
        self.assertIn("fewer than the 100 tasks", per_host)
        only_total = DispatchSettings.from_config({"max_connections": 100})
        self.assertEqual(len(only_total.capped_concurrency(500, "x")), 1)
