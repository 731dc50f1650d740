"""
Tests for quebert.config (the JSON config file) and quebert.tap.Options
(the ``twistd amqp-worker`` command line on top of it).
"""

from __future__ import annotations

import json
import os
import sys

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from quebert.amqp.connection import parse_amqp_url
from quebert.config import (
    DEFAULT_AMQP_URL,
    DEFAULT_MEDIATOR,
    WorkerConfig,
    from_mapping,
    load_file,
    parse_queue_option,
)
from quebert.errors import ConfigurationError
from quebert.registry import Registry
from quebert.retry import RetryPolicy
from quebert.tap import Options
from quebert.worker import apply_legacy_tasks


class AMQPBlockTests(SynchronousTestCase):
    """guillotina_amqp's 'amqp' block becomes quebert settings."""

    def test_defaults_without_a_file(self):
        config = from_mapping({})
        self.assertEqual(config.amqp_url, DEFAULT_AMQP_URL)
        self.assertEqual(config.exchange, "quebert")
        self.assertEqual(config.retry, RetryPolicy())
        self.assertEqual(config.queues, [])
        self.assertEqual([q.name for q in config.queue_settings()], ["default"])

    def test_connection_keys_build_a_url(self):
        config = from_mapping({"amqp": {"host": "rabbit", "port": 5673, "login": "worker",
                                        "password": "secret", "vhost": "/", "heartbeat": 60}})
        self.assertEqual(config.amqp_url, "amqp://worker:secret@rabbit:5673/%2F?heartbeat=60")

    def test_special_characters_are_quoted(self):
        config = from_mapping({"amqp": {"host": "h", "login": "us er@x",
                                        "password": "p@ss:w/rd %#?", "vhost": "my vhost/1"}})
        self.assertNotIn("p@ss", config.amqp_url)
        parameters = parse_amqp_url(config.amqp_url)
        self.assertEqual(parameters.credentials.username, "us er@x")
        self.assertEqual(parameters.credentials.password, "p@ss:w/rd %#?")
        self.assertEqual(parameters.virtual_host, "my vhost/1")

    def test_default_vhost(self):
        config = from_mapping({"amqp": {"host": "h"}})
        self.assertEqual(parse_amqp_url(config.amqp_url).virtual_host, "/")
        self.assertEqual(config.amqp_url, "amqp://guest:guest@h:5672/%2F")

    def test_ssl(self):
        config = from_mapping({"amqp": {"host": "h", "ssl": True}})
        self.assertTrue(config.amqp_url.startswith("amqps://"))

    def test_url_wins(self):
        config = from_mapping({"amqp": {"url": "amqp://a:b@c:1/d", "host": "ignored"}})
        self.assertEqual(config.amqp_url, "amqp://a:b@c:1/d")

    def test_exchange_queue_type_and_limits(self):
        config = from_mapping({"amqp": {"exchange": "guillotina", "queue_type": "quorum",
                                        "max_running_tasks": 30, "errored_ttl_ms": 1000,
                                        "state_ttl": 60}})
        self.assertEqual(config.exchange, "guillotina")
        self.assertEqual(config.queue_type, "quorum")
        self.assertEqual(config.max_running_tasks, 30)
        self.assertEqual(config.errored_ttl_ms, 1000)
        self.assertEqual(config.state_ttl, 60.0)

    def test_errored_ttl_zero_keeps_forever(self):
        self.assertIsNone(from_mapping({"amqp": {"errored_ttl_ms": 0}}).errored_ttl_ms)

    def test_delayed_ttl_becomes_first_backoff(self):
        config = from_mapping({"amqp": {"delayed_ttl_ms": 5000}})
        self.assertEqual(config.retry.min_backoff, 5.0)
        self.assertEqual(config.retry.max_backoff, 3600.0)

    def test_long_delayed_ttl_raises_max_backoff(self):
        config = from_mapping({"amqp": {"delayed_ttl_ms": 7_200_000}})
        self.assertEqual(config.retry.min_backoff, 7200.0)
        self.assertEqual(config.retry.max_backoff, 7200.0)

    def test_max_task_retries_counts_retries(self):
        self.assertEqual(from_mapping({"amqp": {"max_task_retries": 3}}).retry.max_attempts, 4)
        self.assertEqual(from_mapping({"amqp": {"max_task_retries": 0}}).retry.max_attempts, 1)

    def test_retry_block_wins_over_derived_values(self):
        config = from_mapping({"amqp": {"delayed_ttl_ms": 5000, "max_task_retries": 3},
                               "retry": {"max_attempts": 9, "max_backoff": 5}})
        self.assertEqual(config.retry, RetryPolicy(max_attempts=9, min_backoff=5,
                                                   max_backoff=5))

    def test_state_ttl_overridden_by_state_block(self):
        config = from_mapping({"amqp": {"state_ttl": 60}, "state": {"ttl": 120}})
        self.assertEqual(config.state_ttl, 120.0)

    def test_retention_defaults_by_outcome(self):
        """Succeeded records an hour, failed and canceled ones a week."""
        self.assertEqual(from_mapping({}).retention(),
                         {"succeeded": 3600.0, "failed": 604800.0, "canceled": 604800.0})

    def test_state_ttl_sets_every_outcome_the_retention_block_does_not_name(self):
        config = from_mapping({"state": {"ttl": 120, "retention": {"failed": 0}}})
        self.assertEqual(config.retention(),
                         {"succeeded": 120.0, "failed": 0.0, "canceled": 120.0})
        config = from_mapping({"state": {"retention": {"succeeded": 60}}})
        self.assertEqual(config.retention(),
                         {"succeeded": 60.0, "failed": 604800.0, "canceled": 604800.0})

    def test_state_block(self):
        config = from_mapping({"state": {"backend": "memory", "url": "redis://r:6379/2",
                                         "prefix": "q:"}})
        self.assertEqual((config.state, config.redis_url, config.state_prefix),
                         ("memory", "redis://r:6379/2", "q:"))

    def test_bad_state_backend_and_log_level_are_refused_when_loaded(self):
        e = self.assertRaises(ConfigurationError, from_mapping, {"state": {"backend": "sql"}})
        self.assertIn("state backend must be 'redis' or 'memory', not 'sql' (state.backend)",
                      str(e))
        e = self.assertRaises(ConfigurationError, from_mapping, {"log_level": "loud"})
        self.assertIn("unknown log level 'loud' (log_level", str(e))
        self.assertEqual(from_mapping({"log_level": "warn"}).log_level, "warn")

    def test_guillotina_queue(self):
        config = from_mapping({"amqp": {"queue": "guillotina-tasks"}})
        self.assertEqual([q.name for q in config.queue_settings()], ["guillotina-tasks"])

    def test_queues_key_wins_over_amqp_queue(self):
        config = from_mapping({"amqp": {"queue": "g"}, "queues": ["a"]})
        self.assertEqual([q.name for q in config.queue_settings()], ["a"])

    def test_top_level_keys(self):
        config = from_mapping({"shutdown_timeout": 5, "max_message_size": 1000, "threads": 4,
                               "mediator": "quebert.mediator.Mediator", "tasks": ["a.b"],
                               "log_level": "warn", "unknown_top_level": 1})
        self.assertEqual(config.shutdown_timeout, 5.0)
        self.assertEqual(config.max_message_size, 1000)
        self.assertEqual(config.threads, 4)
        self.assertEqual(config.mediator, "quebert.mediator.Mediator")
        self.assertEqual(config.tasks, ["a.b"])
        self.assertEqual(config.log_level, "warn")

    def test_result_size_and_api_caps(self):
        from quebert.config import api_config

        config = from_mapping({"max_result_size": 0, "api": {
            "tokens": ["t" * 20], "max_connections": 10, "max_streams": 2, "max_wait": 5}})
        self.assertEqual(config.max_result_size, 0)
        api = api_config(config)
        self.assertEqual((api.max_connections, api.max_streams, api.max_wait), (10, 2, 5))
        for bad in ({"max_result_size": -1}, {"api": {"max_streams": 0}},
                    {"api": {"max_wait": "x"}}):
            self.assertRaises(ConfigurationError, from_mapping, bad)


class QueuesTests(SynchronousTestCase):
    """'queues' as an object or a list, with per-queue settings."""

    def test_queues_as_object(self):
        config = from_mapping({
            "amqp": {"max_running_tasks": 30},
            "retry": {"max_attempts": 5, "min_backoff": 1, "max_backoff": 300},
            "queues": {"high": {"concurrency": 15}, "low": {"concurrency": 5, "max_attempts": 3,
                                                            "timeout": 60}, "bare": None},
        })
        settings = {q.name: q for q in config.queue_settings()}
        self.assertEqual(settings["high"].concurrency, 15)
        self.assertEqual(settings["high"].retry.max_attempts, 5)
        self.assertEqual(settings["low"].concurrency, 5)
        self.assertEqual(settings["low"].retry.max_attempts, 3)
        self.assertEqual(settings["low"].retry.max_backoff, 300)
        self.assertEqual(settings["low"].timeout, 60)
        self.assertIsNone(settings["high"].timeout)
        self.assertEqual(settings["bare"].concurrency, 30)

    def test_queues_as_list(self):
        config = from_mapping({"queues": ["default", {"name": "low", "concurrency": 2}]})
        settings = config.queue_settings()
        self.assertEqual([(q.name, q.concurrency) for q in settings],
                         [("default", 100), ("low", 2)])

    def test_default_concurrency_capped_at_100(self):
        config = from_mapping({"amqp": {"max_running_tasks": 500}, "queues": ["a"]})
        self.assertEqual(config.queue_settings()[0].concurrency, 100)

    def test_concurrency_is_max_running_tasks_or_the_queues_prefetch(self):
        config = from_mapping({"amqp": {"max_running_tasks": 500},
                               "queues": {"a": {"concurrency": 400}, "b": {"concurrency": 100}}})
        self.assertEqual(config.concurrency(), (500, "--max-running-tasks 500"))
        config = from_mapping({"amqp": {"max_running_tasks": 500}, "queues": ["a"]})
        self.assertEqual(config.concurrency(),
                         (100, "--max-running-tasks 500, but queue concurrency a:100"))

    def test_max_running_tasks_out_of_reach_of_default_concurrency_is_said(self):
        config = from_mapping({"amqp": {"max_running_tasks": 500},
                               "queues": ["a", {"name": "b", "concurrency": 50}]})
        sentence = config.unreachable_running_tasks()
        self.assertIn("--max-running-tasks 500 is never reached: the queues prefetch 150 "
                      "messages together, queue(s) a at the default concurrency", sentence)
        self.assertIn("--queue NAME:CONCURRENCY", sentence)

    def test_max_running_tasks_reachable_or_queues_chosen_is_silent(self):
        for mapping in ({}, {"amqp": {"max_running_tasks": 100}, "queues": ["a"]},
                        {"amqp": {"max_running_tasks": 500},
                         "queues": [{"name": "a", "concurrency": 10}]},
                        {"amqp": {"max_running_tasks": 150}, "queues": ["a", "b"]}):
            self.assertIsNone(from_mapping(mapping).unreachable_running_tasks(), mapping)

    def test_existing_queues(self):
        config = from_mapping({"queues": {"guillotina": {"existing": True}, "new": {},
                                          "old": {"existing": False}}})
        self.assertEqual(config.existing_queues(), frozenset({"guillotina"}))
        self.assertEqual(from_mapping({}).existing_queues(), frozenset())
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"queues": {"q": {"existing": "yes"}}})
        self.assertIn("queues.q.existing", str(e))

    def test_unknown_queue_keys(self):
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"queues": {"low": {"max_attempt": 3, "concurency": 1}}})
        self.assertIn("'low'", str(e))
        self.assertIn("max_attempt", str(e))
        self.assertIn("concurency", str(e))

    def test_bad_queue_names(self):
        for queues in (["bad name"], [{"concurrency": 1}], {"a/b": {}}, [{"name": 5}]):
            self.assertRaises(ConfigurationError, from_mapping, {"queues": queues})

    def test_queue_names_ending_in_a_newline(self):
        """A regex "$" matches before a final newline: such names must still be refused."""
        for end in ("\n", "\r\n"):
            for queues in (["q" + end], {"q" + end: {}}, [{"name": "q" + end}],
                           {"q" + end: {"concurrency": 2}}):
                e = self.assertRaises(ConfigurationError, from_mapping, {"queues": queues})
                self.assertIn("not a valid queue name", str(e))
                self.assertIn(repr("q" + end), str(e))

    def test_bad_queue_values(self):
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"queues": {"q": {"concurrency": 0}}})
        self.assertIn("queues.q.concurrency", str(e))
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"queues": {"q": {"timeout": -1}}})
        self.assertIn("queues.q.timeout", str(e))
        self.assertRaises(ConfigurationError, from_mapping, {"queues": {"q": {"jitter": 3}}})

    def test_queues_must_be_object_or_list(self):
        self.assertRaises(ConfigurationError, from_mapping, {"queues": "default"})

    def test_queue_settings_that_are_not_an_object(self):
        """{"high": 5} is a mistake to report, not a TypeError."""
        e = self.assertRaises(ConfigurationError, from_mapping, {"queues": {"high": 5}})
        self.assertIn("high", str(e))
        self.assertRaises(ConfigurationError, from_mapping, {"queues": [["high", 5]]})

    def test_queue_retry_non_number(self):
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"queues": {"q": {"max_attempts": "three"}}})
        self.assertIn("max_attempts", str(e))

    def test_queue_retry_checked_against_the_top_level_policy(self):
        """
        A queue's min_backoff above the *default* max_backoff (3600) is fine
        when the file's retry block raises max_backoff.
        """
        config = from_mapping({"retry": {"max_backoff": 7200},
                               "queues": {"slow": {"min_backoff": 5000}}})
        retry = config.queue_settings()[0].retry
        self.assertEqual((retry.min_backoff, retry.max_backoff), (5000.0, 7200.0))

    def test_queue_retry_inconsistent_with_top_level_is_refused(self):
        """min_backoff above the top-level max_backoff is refused before the worker runs."""
        e = self.assertRaises(ConfigurationError, from_mapping,
                              {"retry": {"max_backoff": 10},
                               "queues": {"q": {"min_backoff": 20}}})
        self.assertIn("max_backoff", str(e))


class BadValueTests(SynchronousTestCase):
    """Bad values in the file raise ConfigurationError naming the key."""

    def assertBad(self, data, *words):
        e = self.assertRaises(ConfigurationError, from_mapping, data)
        for word in words:
            self.assertIn(word, str(e))
        return e

    def test_retention_of_an_unknown_outcome(self):
        self.assertBad({"state": {"retention": {"running": 60}}}, "state.retention",
                       "'running'")

    def test_retention_must_be_seconds(self):
        self.assertBad({"state": {"retention": {"failed": -1}}}, "state.retention.failed")
        self.assertBad({"state": {"retention": {"failed": "a week"}}}, "state.retention.failed")
        self.assertBad({"state": {"retention": [60]}}, "state.retention")

    def test_max_running_tasks(self):
        self.assertBad({"amqp": {"max_running_tasks": 0}}, "max_running_tasks")
        self.assertBad({"amqp": {"max_running_tasks": "many"}}, "max_running_tasks", "many")

    def test_threads_and_sizes(self):
        self.assertBad({"threads": 0}, "threads")
        self.assertBad({"max_message_size": -1}, "max_message_size")
        self.assertBad({"shutdown_timeout": "soon"}, "shutdown_timeout")
        self.assertBad({"shutdown_timeout": 0}, "shutdown_timeout")

    def test_blocks_of_the_wrong_type(self):
        self.assertBad({"amqp": ["host"]}, "'amqp'")
        self.assertBad({"state": "redis"}, "'state'")
        self.assertBad({"tasks": "app.tasks"}, "'tasks'")
        self.assertBad({"tasks": ["a", 5]}, "'tasks'")

    def test_bad_retry_values(self):
        self.assertBad({"retry": {"max_attempts": 0}}, "max_attempts")
        self.assertBad({"retry": {"max_attempts": "x"}}, "retry")
        self.assertBad({"retry": {"min_backoff": 10, "max_backoff": 5}}, "max_backoff")
        self.assertBad({"amqp": {"delayed_ttl_ms": -5}}, "delayed_ttl_ms")

    def test_unknown_retry_key(self):
        """A misspelt retry option is reported, as it is for queues."""
        self.assertBad({"retry": {"max_attempt": 3}}, "max_attempt")

    def test_guillotina_numbers_that_are_not_numbers(self):
        """Bad numbers in the amqp block are ConfigurationErrors, not ValueErrors."""
        self.assertBad({"amqp": {"errored_ttl_ms": "a week"}}, "errored_ttl_ms")
        self.assertBad({"amqp": {"state_ttl": "a day"}}, "state_ttl")
        self.assertBad({"amqp": {"delayed_ttl_ms": "soon"}}, "delayed_ttl_ms")
        self.assertBad({"amqp": {"max_task_retries": "three"}}, "max_task_retries")
        self.assertBad({"state": {"ttl": "forever"}}, "ttl")

    def test_negative_errored_ttl(self):
        """RabbitMQ refuses a negative x-message-ttl: say so before connecting."""
        self.assertBad({"amqp": {"errored_ttl_ms": -1}}, "errored_ttl_ms")


class LegacyTasksTests(SynchronousTestCase):
    """The ``legacy_tasks`` block: guillotina_amqp task names mapped to registered ones."""

    def test_read(self):
        config = from_mapping({"legacy_tasks": {"guillotina_app.tasks.reindex": "app.reindex"}})
        self.assertEqual(config.legacy_tasks, {"guillotina_app.tasks.reindex": "app.reindex"})
        self.assertEqual(from_mapping({}).legacy_tasks, {})

    def test_bad_blocks(self):
        for block, words in ((["a"], "must be a JSON object"),
                             ({"os.system;x": "app.a"}, "'os.system;x' is not a task name"),
                             ({"old.a": 5}, "5 is not a task name"),
                             ({"old.a": "app a"}, "'app a' is not a task name")):
            e = self.assertRaises(ConfigurationError, from_mapping, {"legacy_tasks": block})
            self.assertIn("legacy_tasks", str(e))
            self.assertIn(words, str(e))

    def test_applied_once_the_tasks_are_registered(self):
        registry = Registry()
        definition = registry.register(lambda: None, "app.reindex")
        apply_legacy_tasks(registry, {"guillotina_app.tasks.reindex": "app.reindex"})
        self.assertIs(registry.get("guillotina_app.tasks.reindex"), definition)
        e = self.assertRaises(ConfigurationError, apply_legacy_tasks, registry,
                              {"guillotina_app.tasks.gone": "app.gone"})
        self.assertIn("legacy_tasks: cannot make 'guillotina_app.tasks.gone' an alias", str(e))
        self.assertIn("no task is registered as 'app.gone'", str(e))


class LoadFileTests(SynchronousTestCase):
    """Reading the JSON file."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_reads_object(self):
        self.assertEqual(load_file(self.write('{"amqp": {"host": "h"}}')),
                         {"amqp": {"host": "h"}})

    def test_missing_file(self):
        path = self.mktemp()
        e = self.assertRaises(ConfigurationError, load_file, path)
        self.assertIn(path, str(e))

    def test_invalid_json(self):
        path = self.write('{"amqp": ')
        e = self.assertRaises(ConfigurationError, load_file, path)
        self.assertIn("not valid JSON", str(e))

    def test_not_an_object(self):
        e = self.assertRaises(ConfigurationError, load_file, self.write("[1]"))
        self.assertIn("JSON object", str(e))

    def test_utf8(self):
        path = self.write('{"amqp": {"password": "pässwörd"}}')
        config = from_mapping(load_file(path))
        self.assertEqual(parse_amqp_url(config.amqp_url).credentials.password, "pässwörd")


class QueueOptionTests(SynchronousTestCase):
    """--queue NAME[:CONCURRENCY]."""

    def test_name_only(self):
        self.assertEqual(parse_queue_option("high"), {"name": "high"})

    def test_with_concurrency(self):
        self.assertEqual(parse_queue_option("high:5"), {"name": "high", "concurrency": 5})

    def test_dotted_name(self):
        self.assertEqual(parse_queue_option("a.b:2"), {"name": "a.b", "concurrency": 2})

    def test_bad(self):
        for value in ("high:0", "high:-1", "high:x", "high:2.5", "bad name", ":5", ""):
            self.assertRaises(ConfigurationError, parse_queue_option, value)

    def test_name_ending_in_a_newline(self):
        for value in ("high\n", "high\r\n", "high\n:5"):
            e = self.assertRaises(ConfigurationError, parse_queue_option, value)
            self.assertIn("not a valid queue name", str(e))


class TapOptionsTests(SynchronousTestCase):
    """quebert.tap.Options: command line over config file."""

    def parse(self, *argv) -> WorkerConfig:
        options = Options()
        options.parseOptions(list(argv))
        return options["worker_config"]

    def bad(self, *argv) -> str:
        e = self.assertRaises(usage.UsageError, Options().parseOptions, list(argv))
        return str(e)

    def write_config(self, data) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return path

    def test_defaults(self):
        config = self.parse()
        self.assertEqual(config.amqp_url, DEFAULT_AMQP_URL)
        self.assertEqual(config.state, "redis")
        self.assertEqual(config.mediator, DEFAULT_MEDIATOR)
        self.assertEqual(config.tasks, [])
        self.assertEqual(config.queues, [])

    def test_state_retention_option(self):
        """--state-retention OUTCOME=SECONDS,... over the file's state.retention."""
        path = self.write_config({"state": {"retention": {"succeeded": 10, "canceled": 20}}})
        config = self.parse("--config", path, "--state-retention", "succeeded=60, failed=0")
        self.assertEqual(config.retention(),
                         {"succeeded": 60.0, "failed": 0.0, "canceled": 20.0})
        self.assertIn("OUTCOME=SECONDS", self.bad("--state-retention", "60"))
        self.assertIn("'queued'", self.bad("--state-retention", "queued=60"))

    def test_command_line_overrides_file(self):
        path = self.write_config({
            "amqp": {"host": "rabbit", "max_running_tasks": 30, "exchange": "fromfile"},
            "queues": {"high": {"concurrency": 15}},
            "tasks": ["json"],
            "threads": 3,
            "shutdown_timeout": 10,
            "state": {"backend": "memory"},
        })
        config = self.parse("--config", path, "--max-running-tasks", "5", "--queue", "q1:3",
                            "--tasks", "os", "--exchange", "cli", "--threads", "7",
                            "--shutdown-timeout", "2.5", "--amqp-url", "amqp://u:p@other/v")
        self.assertEqual(config.max_running_tasks, 5)
        self.assertEqual(config.queues, [{"name": "q1", "concurrency": 3}])
        self.assertEqual(config.tasks, ["json", "os"])
        self.assertEqual(config.exchange, "cli")
        self.assertEqual(config.threads, 7)
        self.assertEqual(config.shutdown_timeout, 2.5)
        self.assertEqual(config.amqp_url, "amqp://u:p@other/v")
        self.assertEqual(config.state, "memory")

    def test_file_values_kept_when_not_overridden(self):
        path = self.write_config({"amqp": {"host": "rabbit", "max_running_tasks": 30},
                                  "queues": ["a", "b"]})
        config = self.parse("-c", path)
        self.assertEqual(config.max_running_tasks, 30)
        self.assertEqual([q.name for q in config.queue_settings()], ["a", "b"])
        self.assertIn("@rabbit:5672", config.amqp_url)

    def test_repeatable_tasks_and_queues(self):
        config = self.parse("--tasks", "json", "--tasks", "os.path", "--queue", "a",
                            "--queue", "b:2", "--queue", "c.d:10", "--state", "memory")
        self.assertEqual(config.tasks, ["json", "os.path"])
        self.assertEqual(config.queues, [{"name": "a"}, {"name": "b", "concurrency": 2},
                                         {"name": "c.d", "concurrency": 10}])
        settings = config.queue_settings()
        self.assertEqual([(q.name, q.concurrency) for q in settings],
                         [("a", 100), ("b", 2), ("c.d", 10)])

    def test_bad_queue_option(self):
        self.assertIn("concurrency", self.bad("--queue", "high:x"))
        self.assertIn("concurrency", self.bad("--queue", "high:0"))
        self.assertIn("not a valid queue name", self.bad("--queue", "bad name"))
        self.assertIn("not a valid queue name", self.bad("--queue", "high\n"))
        self.assertIn("not a valid queue name", self.bad("--queue", "high\n:2"))

    def test_bad_numbers(self):
        message = self.bad("--max-running-tasks", "many")
        self.assertIn("--max-running-tasks", message)
        self.assertIn("many", message)
        self.assertIn("--max-running-tasks", self.bad("--max-running-tasks", "0"))
        self.assertIn("--threads", self.bad("--threads", "-1"))
        self.assertIn("--threads", self.bad("--threads", "1.5"))
        self.assertIn("--shutdown-timeout", self.bad("--shutdown-timeout", "soon"))
        self.assertIn("--shutdown-timeout", self.bad("--shutdown-timeout", "-1"))
        self.assertIn("--max-message-size", self.bad("--max-message-size", "0"))

    def test_non_finite_shutdown_timeout(self):
        """'nan' and 'inf' parse as floats but are no timeout the reactor can use."""
        self.assertIn("--shutdown-timeout", self.bad("--shutdown-timeout", "nan"))
        self.assertIn("--shutdown-timeout", self.bad("--shutdown-timeout", "inf"))

    def test_unknown_mediator(self):
        message = self.bad("--mediator", "no_such_module_q.Mediator")
        self.assertIn("no_such_module_q.Mediator", message)
        message = self.bad("--mediator", "json.dumps")
        self.assertIn("not a subclass", message)

    def test_known_mediator(self):
        config = self.parse("--mediator", "quebert.mediator.Mediator")
        self.assertEqual(config.mediator, "quebert.mediator.Mediator")

    def test_unimportable_tasks_module(self):
        message = self.bad("--tasks", "no_such_tasks_module_q")
        self.assertIn("cannot import tasks module 'no_such_tasks_module_q'", message)

    def test_tasks_module_that_fails_on_import(self):
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "quebert_broken_tasks_q.py"), "w") as f:
            f.write("raise RuntimeError('database not configured')\n")
        sys.path.insert(0, directory)
        self.addCleanup(sys.path.remove, directory)
        self.addCleanup(sys.modules.pop, "quebert_broken_tasks_q", None)
        message = self.bad("--tasks", "quebert_broken_tasks_q")
        self.assertIn("quebert_broken_tasks_q", message)
        self.assertIn("database not configured", message)

    def test_bad_urls(self):
        self.assertIn("AMQP URL", self.bad("--amqp-url", "http://rabbit/"))
        self.assertIn("Redis URL", self.bad("--redis-url", "http://redis/"))

    def test_bad_amqp_url_does_not_show_password(self):
        message = self.bad("--amqp-url", "http://user:sup3rsecret@rabbit/")
        self.assertNotIn("sup3rsecret", message)

    def test_redis_url_selects_redis_unless_state_given(self):
        path = self.write_config({"state": {"backend": "memory"}})
        config = self.parse("-c", path, "--redis-url", "redis://r:6379/1")
        self.assertEqual((config.state, config.redis_url), ("redis", "redis://r:6379/1"))
        config = self.parse("--state", "memory", "--redis-url", "redis://r:6379/1")
        self.assertEqual(config.state, "memory")

    def test_bad_state(self):
        self.assertIn("--state", self.bad("--state", "mongo"))

    def test_bad_exchange_and_queue_type(self):
        self.assertIn("exchange", self.bad("--exchange", "bad name"))
        self.assertIn("exchange", self.bad("--exchange", "quebert\n"))
        self.assertIn("stream", self.bad("--queue-type", "stream"))

    def test_queue_retry_inconsistent_with_file_retry(self):
        path = self.write_config({"retry": {"max_backoff": 10},
                                  "queues": {"q": {"min_backoff": 20}}})
        self.assertIn("min_backoff", self.bad("--config", path))

    def test_bad_config_file(self):
        self.assertIn("cannot read config file", self.bad("--config", self.mktemp()))
        path = self.write_config({"queues": {"low": {"bogus": 1}}})
        message = self.bad("--config", path)
        self.assertIn("bogus", message)
        self.assertIn("'low'", message)

    def test_unknown_option(self):
        self.assertRaises(usage.UsageError, Options().parseOptions, ["--no-such-option"])


class CredentialsConfigTests(SynchronousTestCase):
    """``dispatch.credentials``: checked with the file, tokens read by the worker only."""

    RULE = {"url_prefix": "http://127.0.0.1:8080/db/", "token_env": "QUEBERT_CONFIG_TEST_TOKEN"}

    def write_config(self, data) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
        return path

    def test_rules_parsed_without_reading_the_token(self):
        self.patch(os, "environ", {})
        config = from_mapping({"dispatch": {"credentials": [self.RULE]}})
        [rule] = config.dispatch_settings().credentials
        self.assertEqual((rule.url_prefix, rule.token_env),
                         ("http://127.0.0.1:8080/db/", "QUEBERT_CONFIG_TEST_TOKEN"))
        # what quebert-api and Client use needs no token
        config.dispatch_settings().policy.check_url("http://127.0.0.1:8080/db/x")

    def test_bad_rule_is_a_usage_error(self):
        path = self.write_config({"dispatch": {"credentials": [
            {"url_prefix": "http://h/", "token": "literal-secret-123"}]}})
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertIn("dispatch.credentials[0].token", str(e))
        self.assertNotIn("literal-secret-123", str(e))

    def test_missing_token_is_a_usage_error_of_the_worker_only(self):
        from quebert import api_tap

        self.patch(os, "environ", {})
        path = self.write_config({"dispatch": {"credentials": [self.RULE]}})
        e = self.assertRaises(usage.UsageError, Options().parseOptions, ["-c", path])
        self.assertIn("the environment variable QUEBERT_CONFIG_TEST_TOKEN, which is not set "
                      "or empty", str(e))
        api = api_tap.Options()
        api.parseOptions(["-c", path, "--http-port", "0", "--api-token", "t" * 20])
        self.assertEqual(len(api["worker_config"].dispatch_settings().credentials), 1)

    def test_worker_service_checks_the_token_before_it_connects(self):
        from quebert.tap import makeService

        self.patch(os, "environ", {"QUEBERT_CONFIG_TEST_TOKEN": "x" * 20})
        options = Options()
        options.parseOptions(["-c", self.write_config({"dispatch": {"credentials": [
            self.RULE]}}), "--state", "memory"])
        self.patch(os, "environ", {})
        e = self.assertRaises(usage.UsageError, makeService, options)
        self.assertIn("QUEBERT_CONFIG_TEST_TOKEN, which is not set or empty", str(e))
