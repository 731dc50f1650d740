"""
Unit tests of the Guillotina bridge: settings, task ids, the context
field, URL resolution, refused headers and options, the service-token
validator.  No server: ``tests.test_bridge_guillotina_live`` runs the
real thing.
"""

from __future__ import annotations

import asyncio
import json

from guillotina._settings import app_settings
from twisted.trial.unittest import SynchronousTestCase

from quebert import protocol
from quebert.bridge.guillotina import TaskId, add_task, add_url_task, task
from quebert.bridge.guillotina.api import _callback_target, container_task_id
from quebert.bridge.guillotina.auth import ServiceTokenValidator
from quebert.bridge.guillotina.bridge import get_bridge, job_data
from quebert.bridge.guillotina.settings import DEFAULTS, BridgeSettings
from quebert.bridge.guillotina.state import BridgeState
from quebert.errors import ConfigurationError, InvalidMessage, SerializationError
from quebert.registry import TaskFunction, default_registry
from tests.guillotina_bridge_tasks import touch

TOKEN = "a-service-token-0123456789"
SCOPE = {"db_id": "db", "container_id": "c1", "user_id": "root", "path": "/folder"}


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        settings = BridgeSettings.from_mapping(None)
        self.assertEqual((settings.exchange, settings.queue, settings.callback_url,
                          settings.service_token), ("quebert", "default", None, None))
        self.assertEqual(set(DEFAULTS), set(BridgeSettings.__annotations__))

    def test_callback_url_loses_its_trailing_slash(self) -> None:
        settings = BridgeSettings.from_mapping({"callback_url": "http://app:8080/"})
        self.assertEqual(settings.callback_url, "http://app:8080")

    def test_bad_values_name_their_key(self) -> None:
        for key, value in (("amqp_url", "http://x"), ("exchange", "bad name"),
                           ("queue", ""), ("queue", "q\n"), ("queue", "q\r\n"),
                           ("exchange", "quebert\n"),
                           ("queue_type", "stream"), ("redis_url", "x://"),
                           ("state_ttl", -1), ("publish_timeout", 0),
                           ("state_retention", {"running": 60}),
                           ("state_retention", {"failed": -1}),
                           ("state_retention", [60]),
                           ("callback_url", "/relative"),
                           ("callback_url", "http://user:pw@app"),
                           ("service_token", "short"), ("service_token", "has space " * 3),
                           ("nonsense", 1)):
            with self.assertRaises(ConfigurationError, msg=key) as raised:
                BridgeSettings.from_mapping({key: value})
            self.assertIn(key, str(raised.exception))

    def test_retention_by_outcome_as_the_workers_have_it(self) -> None:
        """The bridge's writes (a cancel) give records the workers' retention."""
        settings = BridgeSettings.from_mapping({"state_retention": {"failed": 0}})
        self.assertEqual((settings.state_ttl, settings.state_retention), (None, {"failed": 0.0}))
        import redis.asyncio

        client = redis.asyncio.Redis()  # (connects on first use only)
        state = BridgeState(client, retention=settings.state_retention)
        self.assertEqual(state._ttl_ms, "3600000,0,604800000")
        self.assertEqual(state.finished_ttl, 0)
        self.assertEqual(BridgeState(client, finished_ttl=60)._ttl_ms,
                         "60000,60000,60000")

    def test_token_is_not_in_the_repr(self) -> None:
        settings = BridgeSettings.from_mapping({"service_token": TOKEN})
        self.assertNotIn(TOKEN, repr(settings))


class TaskIdTests(SynchronousTestCase):
    def test_container_form(self) -> None:
        task_id = container_task_id("db", "c1")
        self.assertRegex(task_id, r"^task:db-c1-[0-9a-f]{32}$")
        protocol.build("x", queue="q", task_id=task_id)

    def test_other_characters_are_written_in_hex(self) -> None:
        task_id = container_task_id("db", "my container@home")
        self.assertTrue(task_id.startswith("task:db-my_20container_40home-"), task_id)
        protocol.build("x", queue="q", task_id=task_id)

    def test_long_ids_fit(self) -> None:
        task_id = container_task_id("d" * 150, "c" * 150)
        self.assertEqual(len(task_id), 200)
        self.assertRegex(task_id, r"-[0-9a-f]{32}$")
        protocol.build("x", queue="q", task_id=task_id)

    def test_task_id_is_a_str_with_task_id(self) -> None:
        task_id = TaskId("task:db-c1-x")
        self.assertEqual((task_id, task_id.task_id, json.dumps(task_id)),
                         ("task:db-c1-x", "task:db-c1-x", '"task:db-c1-x"'))


class BodyTests(SynchronousTestCase):
    def test_context_travels_in_a_valid_v1_body(self) -> None:
        message, body = protocol.build("app.t", (1,), {"k": "v"}, queue="q", context=SCOPE)
        self.assertEqual(json.loads(body)["context"], SCOPE)
        decoded = protocol.decode(body, "application/json")
        self.assertEqual((decoded.id, decoded.task, decoded.args, dict(decoded.context)),
                         (message.id, "app.t", (1,), SCOPE))

    def test_job_data_shows_the_message_and_its_context(self) -> None:
        message, _ = protocol.build("app.t", (1,), {"k": "v"}, queue="q", context=SCOPE)
        self.assertEqual(job_data(message), {"kind": "call", "task": "app.t", "args": [1],
                                             "kwargs": {"k": "v"}, "context": SCOPE})
        message, _ = protocol.build("app.t", queue="q")
        self.assertIsNone(job_data(message)["context"])


class URLTargetTests(SynchronousTestCase):
    def test_resolution(self) -> None:
        base = "http://app:8080"
        self.assertEqual(_callback_target("https://hooks.example/x", None, {}),
                         "https://hooks.example/x")
        self.assertEqual(_callback_target("/db/c1/@hook", base, {}), base + "/db/c1/@hook")
        self.assertEqual(_callback_target("@hook", base, SCOPE), base + "/db/c1/folder/@hook")
        self.assertEqual(_callback_target("@hook", base, {**SCOPE, "path": "/"}),
                         base + "/db/c1/@hook")

    def test_paths_need_a_callback_url_and_a_container(self) -> None:
        self.assertRaises(ConfigurationError, _callback_target, "/db/c1/@hook", None, SCOPE)
        self.assertRaises(ConfigurationError, _callback_target, "@hook", "http://app", {})
        self.assertRaises(ConfigurationError, _callback_target, "", "http://app", SCOPE)


class RefusedAtTheCallTests(SynchronousTestCase):
    """Mistakes are refused before anything is sent (and without a running bridge)."""

    def test_credentials_headers(self) -> None:
        for name in ("Authorization", "cookie", "Proxy-Authorization"):
            with self.assertRaises(ConfigurationError) as raised:
                asyncio.run(add_url_task("/db/c1/@hook", headers={name: "x"}))
            self.assertIn("credentials never travel", str(raised.exception))

    def test_unknown_options_and_functions(self) -> None:
        self.assertRaises(ConfigurationError, asyncio.run, add_task("app.t", _retries=3))

        def not_a_task() -> None:
            """Never registered."""

        self.assertRaises(ConfigurationError, asyncio.run, add_task(not_a_task))

    def test_arguments_must_fit_a_registered_task(self) -> None:
        self.assertRaises(InvalidMessage, asyncio.run, add_task(touch, "/a", 1, 2))

    def test_no_bridge_says_so(self) -> None:
        with self.assertRaises(ConfigurationError) as raised:
            get_bridge()
        self.assertIn("quebert.bridge.guillotina", str(raised.exception))

    def test_unserialisable_arguments(self) -> None:
        # protocol.build, which add_task calls, is what refuses them.
        self.assertRaises(SerializationError, protocol.build, "app.t", (object(),), queue="q")


class DecoratorTests(SynchronousTestCase):
    def test_registers_like_quebert_task(self) -> None:
        self.assertIsInstance(touch, TaskFunction)
        self.assertIs(default_registry.lookup("bridge_test.touch").fn, touch.fn)
        self.assertEqual(touch.definition.queue, "bridge-test")
        self.assertEqual(touch.run("/p", times=2), {"path": "/p", "times": 2})

    def test_calling_returns_a_coroutine(self) -> None:
        @task(name="bridge_test.unit_only")
        def unit_only() -> None:
            """Registered for this test only."""

        self.addCleanup(default_registry.unregister, "bridge_test.unit_only")
        call = unit_only()
        self.assertTrue(asyncio.iscoroutine(call))
        self.assertRaises(ConfigurationError, asyncio.run, call)  # no running bridge

    def test_other_registries_are_refused(self) -> None:
        from quebert.registry import Registry

        self.assertRaises(ConfigurationError, task, registry=Registry())


class ServiceTokenValidatorTests(SynchronousTestCase):
    def setUp(self) -> None:
        saved = app_settings.get("quebert")
        self.addCleanup(app_settings.__setitem__, "quebert", saved)

    def validate(self, token) -> object:
        return asyncio.run(ServiceTokenValidator().validate(token))

    def test_right_token_is_the_service_principal(self) -> None:
        app_settings["quebert"] = {"service_token": TOKEN}
        user = self.validate({"type": "bearer", "token": TOKEN})
        self.assertEqual((user.id, dict(user.roles)), ("quebert-service", {"quebert.Worker": 1}))

    def test_anything_else_is_nobody(self) -> None:
        app_settings["quebert"] = {"service_token": TOKEN}
        for token in ({"type": "bearer", "token": TOKEN + "x"},
                      {"type": "bearer", "token": TOKEN[:-1]},
                      {"type": "basic", "token": TOKEN}, {"type": "bearer"},
                      {"type": "bearer", "token": None}):
            self.assertIsNone(self.validate(token), token)

    def test_no_token_configured_is_nobody(self) -> None:
        for settings in ({"service_token": None}, {"service_token": ""}, {}, None):
            app_settings["quebert"] = settings
            self.assertIsNone(self.validate({"type": "bearer", "token": ""}))
            self.assertIsNone(self.validate({"type": "bearer", "token": "None"}))
