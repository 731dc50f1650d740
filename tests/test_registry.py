"""
Tests for quebert.registry: registering tasks and looking them up.

Every test uses its own Registry(); the default registry is never touched
(tests that could leak into it clean up after themselves).
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from quebert.errors import ConfigurationError, InvalidMessage, UnknownTask
from quebert.registry import (
    REACTOR,
    THREAD,
    Registry,
    TaskDefinition,
    TaskFunction,
    default_registry,
    task,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add(x, y):
    """Add two numbers."""
    return x + y


def other(x, y):
    return x - y


async def fetch(url, *, timeout=10):
    return url


@defer.inlineCallbacks
def legacy(value):
    result = yield defer.succeed(value)
    return result


def returns_deferred(value):
    return defer.succeed(value)


def kwonly(a, *, b, c=3):
    return a + b + c


class RegisterTests(SynchronousTestCase):
    """Registry.register: names, options, conflicts."""

    def setUp(self):
        self.registry = Registry()

    def test_default_name_is_module_and_qualname(self):
        definition = self.registry.register(add)
        self.assertEqual(definition.name, "tests.test_registry.add")
        self.assertIn("tests.test_registry.add", self.registry)
        self.assertIs(self.registry.get("tests.test_registry.add").fn, add)

    def test_explicit_name(self):
        definition = self.registry.register(add, "math.add")
        self.assertEqual(definition.name, "math.add")
        self.assertNotIn("tests.test_registry.add", self.registry)

    def test_local_function_needs_an_explicit_name(self):
        """'<locals>' cannot appear in a task name."""

        def local():
            pass

        e = self.assertRaises(ConfigurationError, self.registry.register, local)
        self.assertIn("<locals>", str(e))
        self.assertEqual(self.registry.register(local, "local").name, "local")

    def test_invalid_names(self):
        for name in ("os.system;", "has space", "1starts.with.digit", "a/b"):
            self.assertRaises(ConfigurationError, self.registry.register, add, name)
        self.assertEqual(len(self.registry), 0)

    def test_defaults(self):
        definition = self.registry.register(add)
        self.assertEqual(definition, TaskDefinition(name="tests.test_registry.add", fn=add))
        self.assertIsNone(definition.queue)
        self.assertIsNone(definition.timeout)
        self.assertEqual(definition.retry, {})
        self.assertEqual(definition.executor, THREAD)

    def test_options(self):
        definition = self.registry.register(add, queue="high", timeout=30, max_attempts=3,
                                            min_backoff=2, max_backoff=None)
        self.assertEqual(definition.queue, "high")
        self.assertEqual(definition.timeout, 30)
        self.assertEqual(definition.retry, {"max_attempts": 3, "min_backoff": 2})

    def test_unknown_option(self):
        e = self.assertRaises(ConfigurationError, self.registry.register, add, retries=3)
        self.assertIn("retries", str(e))
        self.assertIn("tests.test_registry.add", str(e))

    def test_invalid_queue(self):
        self.assertRaises(ConfigurationError, self.registry.register, add, queue="bad queue")
        for end in ("\n", "\r\n"):
            self.assertRaises(ConfigurationError, self.registry.register, add, queue="q" + end)
            self.assertRaises(ConfigurationError, self.registry.register, add,
                              name="app.add" + end)
        self.assertEqual(list(self.registry), [])

    def test_invalid_executor(self):
        self.assertRaises(ConfigurationError, self.registry.register, add, executor="fork")
        # ("process" is valid: tests.test_process tests what it accepts)

    def test_same_function_twice_is_harmless(self):
        first = self.registry.register(add)
        second = self.registry.register(add)
        self.assertEqual(first, second)
        self.assertEqual(len(self.registry), 1)

    def test_same_function_new_options_replace(self):
        self.registry.register(add, queue="a")
        self.registry.register(add, queue="b")
        self.assertEqual(self.registry.get("tests.test_registry.add").queue, "b")

    def test_duplicate_name_with_different_function(self):
        self.registry.register(add, "math.op")
        e = self.assertRaises(ConfigurationError, self.registry.register, other, "math.op")
        self.assertIn("math.op", str(e))
        self.assertIn("tests.test_registry.add", str(e))
        self.assertIs(self.registry.get("math.op").fn, add)

    def test_reloaded_function_replaces(self):
        """A new function object for the same code (module reload) is accepted."""

        def add(x, y):
            return x + y

        add.__module__ = "tests.test_registry"
        add.__qualname__ = "add"
        self.registry.register(globals()["add"])
        definition = self.registry.register(add)
        self.assertIs(self.registry.get("tests.test_registry.add").fn, add)
        self.assertIs(definition.fn, add)


class ExecutorDetectionTests(SynchronousTestCase):
    """Which executor a task gets when none is given."""

    def setUp(self):
        self.registry = Registry()

    def test_async_def_runs_on_reactor(self):
        self.assertEqual(self.registry.register(fetch).executor, REACTOR)

    def test_inline_callbacks_runs_on_reactor(self):
        self.assertEqual(self.registry.register(legacy).executor, REACTOR)

    def test_plain_function_runs_in_thread(self):
        self.assertEqual(self.registry.register(add).executor, THREAD)

    def test_deferred_returning_function_needs_explicit_executor(self):
        self.assertEqual(self.registry.register(returns_deferred).executor, THREAD)
        self.assertEqual(
            self.registry.register(returns_deferred, executor=REACTOR).executor, REACTOR
        )

    def test_explicit_thread_for_async(self):
        self.assertEqual(self.registry.register(fetch, executor=THREAD).executor, THREAD)


class BindTests(SynchronousTestCase):
    """TaskDefinition.bind checks arguments against the signature."""

    def setUp(self):
        self.registry = Registry()

    def test_fitting_arguments(self):
        self.registry.register(add).bind((1, 2), {})
        self.registry.register(add).bind((1,), {"y": 2})
        self.registry.register(kwonly).bind((1,), {"b": 2})

    def test_too_many_arguments(self):
        definition = self.registry.register(add)
        e = self.assertRaises(InvalidMessage, definition.bind, (1, 2, 3), {}, "tid")
        self.assertIn("tests.test_registry.add", e.reason)
        self.assertEqual(e.field, "args")
        self.assertEqual(e.task_id, "tid")

    def test_missing_argument(self):
        definition = self.registry.register(kwonly, "kw")
        e = self.assertRaises(InvalidMessage, definition.bind, (1,), {})
        self.assertIn("'kw'", e.reason)
        self.assertIn("b", e.reason)
        self.assertIsNone(e.task_id)

    def test_unexpected_keyword(self):
        definition = self.registry.register(fetch)
        e = self.assertRaises(InvalidMessage, definition.bind, ("u",), {"bogus": 1}, "t1")
        self.assertIn("bogus", e.reason)
        self.assertIn("fetch", e.reason)

    def test_uninspectable_callable_is_not_checked(self):
        definition = self.registry.register(max, "builtin.max")  # no signature
        definition.bind((1, 2, 3, 4, 5), {"x": 1})


class BindFastPathTests(SynchronousTestCase):
    """The positional-arity shortcut of ``bind`` agrees with ``Signature.bind``."""

    def test_agrees_with_signature_bind(self):
        import inspect

        def f0():
            pass

        def f1(a, b=1):
            pass

        def f2(a, *rest):
            pass

        def f3(a, /, b, *, k):
            pass

        def f4(a, *, k=1, **kw):
            pass

        def f5(a=1, b=2):
            pass

        def f6(a, b, c):
            pass

        for fn in (f0, f1, f2, f3, f4, f5, f6):
            definition = TaskDefinition("t", fn)
            signature = inspect.signature(fn)
            for count in range(5):
                for kwargs in ({}, {"k": 1}, {"a": 1}):
                    args = tuple(range(count))
                    try:
                        signature.bind(*args, **kwargs)
                    except TypeError:
                        expected = False
                    else:
                        expected = True
                    try:
                        definition.bind(args, kwargs)
                    except InvalidMessage:
                        got = False
                    else:
                        got = True
                    self.assertEqual(got, expected, (fn.__name__, args, kwargs))


class LookupTests(SynchronousTestCase):
    """get, lookup, find_function and the container protocol."""

    def setUp(self):
        self.registry = Registry()
        self.registry.register(add)
        self.registry.register(other, "b.other")

    def test_unknown_task(self):
        e = self.assertRaises(UnknownTask, self.registry.get, "nope.task", "tid")
        self.assertIsInstance(e, InvalidMessage)
        self.assertEqual(e.field, "task")
        self.assertEqual(e.task_id, "tid")
        self.assertIn("nope.task", e.reason)
        self.assertIn("--tasks", e.reason)

    def test_lookup(self):
        self.assertIs(self.registry.lookup("b.other").fn, other)
        self.assertIsNone(self.registry.lookup("nope"))

    def test_find_function(self):
        self.assertEqual(self.registry.find_function(other).name, "b.other")
        self.assertIsNone(self.registry.find_function(fetch))

    def test_container_protocol(self):
        self.assertEqual(list(self.registry), ["b.other", "tests.test_registry.add"])
        self.assertEqual(len(self.registry), 2)
        self.assertIn("b.other", self.registry)
        self.assertNotIn("c", self.registry)

    def test_unregister(self):
        self.registry.unregister("b.other")
        self.registry.unregister("never.registered")
        self.assertNotIn("b.other", self.registry)
        self.assertEqual(len(self.registry), 1)

    def test_registries_are_independent(self):
        self.assertNotIn("b.other", default_registry)
        self.assertNotIn("b.other", Registry())


class FakeClient:
    def __init__(self):
        self.calls = []

    def add_task(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        return defer.succeed(name)


class TaskDecoratorTests(SynchronousTestCase):
    """@task and TaskFunction."""

    def setUp(self):
        # Not empty: an empty Registry is falsy, which test_empty_registry_is_used
        # checks on its own; the other tests must not leak into default_registry.
        self.registry = Registry()
        self.registry.register(other, "sentinel.other")

    def test_bare_decorator_with_registry(self):
        decorated = task(add, registry=self.registry)
        self.assertIsInstance(decorated, TaskFunction)
        self.assertIn("tests.test_registry.add", self.registry)

    def test_decorator_with_options(self):
        registry = self.registry

        @task(name="jobs.mul", queue="high", max_attempts=2, registry=registry)
        def mul(x, y):
            """Multiply."""
            return x * y

        definition = self.registry.get("jobs.mul")
        self.assertEqual(definition.queue, "high")
        self.assertEqual(definition.retry, {"max_attempts": 2})
        self.assertEqual(mul.name, "jobs.mul")
        self.assertEqual(mul.__doc__, "Multiply.")
        self.assertEqual(mul.__name__, "mul")
        self.assertIs(mul.definition, definition)
        self.assertIn("jobs.mul", repr(mul))

    def test_empty_registry_is_used(self):
        """
        A fresh (empty, hence falsy) registry passed to @task is the one
        registered in, not the default registry.
        """
        self.addCleanup(default_registry.unregister, "jobs.fresh")
        registry = Registry()
        task(add, name="jobs.fresh", registry=registry)
        self.assertIn("jobs.fresh", registry)
        self.assertNotIn("jobs.fresh", default_registry)

    def test_run_calls_the_original(self):
        decorated = task(add, registry=self.registry)
        self.assertEqual(decorated.run(2, 3), 5)
        self.assertIs(decorated.__wrapped__, add)

    def test_run_async_task_returns_coroutine_result(self):
        decorated = task(fetch, registry=self.registry)
        self.assertEqual(self.successResultOf(defer.ensureDeferred(decorated.run("u"))), "u")

    def test_enqueue_with_given_client(self):
        decorated = task(add, registry=self.registry)
        client = FakeClient()
        d = decorated.enqueue(1, y=2, _client=client)
        self.assertEqual(self.successResultOf(d), "tests.test_registry.add")
        self.assertEqual(client.calls, [("tests.test_registry.add", (1,), {"y": 2})])

    def test_decorator_validates(self):
        self.assertRaises(ConfigurationError, task, name="bad name", registry=self.registry,
                          fn=add)
        self.assertEqual(list(self.registry), ["sentinel.other"])


class DefaultClientTests(SynchronousTestCase):
    """
    Calling a TaskFunction publishes through the default client, which the
    registry finds in quebert._default_client without importing
    quebert.client (tests.test_import_graph checks the import graph).
    """

    def setUp(self):
        import quebert
        from quebert import _default_client

        self.hook = _default_client
        saved = (_default_client._client, _default_client._factory)

        def restore():
            _default_client._client, _default_client._factory = saved

        self.addCleanup(restore)
        self.hook.set_client(None)
        self.registry = Registry()
        self.decorated = task(add, registry=self.registry)
        self.package = quebert

    def test_call_publishes_through_the_default_client(self):
        from quebert.client import get_default_client, set_default_client

        client = FakeClient()
        set_default_client(client)
        self.assertIs(get_default_client(), client)
        self.assertEqual(self.successResultOf(self.decorated(1, 2)), "tests.test_registry.add")
        self.assertEqual(client.calls, [("tests.test_registry.add", (1, 2), {})])

    def test_none_set_the_factory_makes_it_once(self):
        made = []

        def factory():
            made.append(FakeClient())
            return made[-1]

        self.hook.set_factory(factory)
        self.decorated(1, 2)
        self.decorated(3, 4)
        self.assertEqual(len(made), 1)
        self.assertEqual(len(made[0].calls), 2)

    def test_no_factory_is_a_clear_error(self):
        self.hook.set_factory(None)
        e = self.assertRaises(ConfigurationError, self.decorated, 1, 2)
        self.assertIn("set_default_client", str(e))

    def test_the_package_registers_a_client_from_the_environment(self):
        """The documented default: Client($QUEBERT_AMQP_URL), made on first use."""
        from quebert.client import Client, get_default_client

        self.assertIs(self.hook._factory, self.package._client_from_environment)
        self.patch(os, "environ", dict(os.environ, QUEBERT_AMQP_URL="amqp://u:p@h.invalid:5/v"))
        client = get_default_client()
        self.assertIsInstance(client, Client)
        self.assertEqual(client.broker.publishing.url, "amqp://u:p@h.invalid:5/v")
        self.assertIs(get_default_client(), client)
        self.assertFalse(client.broker.running)  # connects on its first task only

    def test_registry_does_not_import_the_client(self):
        """In a fresh interpreter: declaring and looking up tasks needs no client module."""
        script = ("import sys\nfrom quebert import task\n"
                  "@task(name='a.b')\ndef f():\n    pass\n"
                  "print('quebert.client' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "False"), done.stderr)


class AliasTests(SynchronousTestCase):
    """Further names of a registered task: legacy (guillotina_amqp) dotted paths."""

    def setUp(self):
        self.registry = Registry()
        self.definition = self.registry.register(add, "jobs.add")

    def test_alias_resolves_to_the_task(self):
        self.registry.alias("old_app.tasks.add", "jobs.add")
        self.assertIs(self.registry.get("old_app.tasks.add"), self.definition)
        self.assertIs(self.registry.lookup("old_app.tasks.add"), self.definition)
        self.assertEqual(self.registry.aliases, {"old_app.tasks.add": "jobs.add"})
        # an alias is a name for messages, not a task of its own
        self.assertEqual(list(self.registry), ["jobs.add"])
        self.assertNotIn("old_app.tasks.add", self.registry)

    def test_alias_of_an_alias_points_to_the_task(self):
        self.registry.alias("v2.add", "jobs.add")
        self.registry.alias("v1.add", "v2.add")
        self.assertEqual(self.registry.aliases, {"v2.add": "jobs.add", "v1.add": "jobs.add"})

    def test_same_alias_again_is_harmless(self):
        self.registry.alias("old.add", "jobs.add")
        self.registry.alias("old.add", "jobs.add")
        self.assertEqual(self.registry.aliases, {"old.add": "jobs.add"})

    def test_conflicts_are_refused(self):
        self.registry.register(other, "jobs.other")
        self.registry.alias("old.add", "jobs.add")
        for old, new, words in (
            ("old.add", "jobs.other", "already an alias of 'jobs.add'"),
            ("jobs.other", "jobs.add", "a task is registered as 'jobs.other'"),
            ("old.x", "jobs.missing", "no task is registered as 'jobs.missing'"),
            ("os.system;rm", "jobs.add", "not a valid task name"),
            ("old\n", "jobs.add", "not a valid task name"),
        ):
            e = self.assertRaises(ConfigurationError, self.registry.alias, old, new)
            self.assertIn(words, str(e))
        e = self.assertRaises(ConfigurationError, self.registry.register, other, "old.add")
        self.assertIn("already an alias of 'jobs.add'", str(e))

    def test_unknown_names_still_refused(self):
        self.registry.alias("old.add", "jobs.add")
        e = self.assertRaises(UnknownTask, self.registry.get, "old.sub", "t1")
        self.assertEqual((e.field, e.task_id), ("task", "t1"))
        self.assertIsNone(self.registry.lookup("old.sub"))

    def test_unregister_drops_the_aliases(self):
        self.registry.alias("old.add", "jobs.add")
        self.registry.unregister("jobs.add")
        self.assertEqual(self.registry.aliases, {})
        self.assertIsNone(self.registry.lookup("old.add"))

    def test_register_and_decorator_take_aliases(self):
        registry = self.registry

        @task(name="jobs.mul", aliases=("guillotina_app.tasks.mul", "old.mul"),
              registry=registry)
        def mul(x, y):
            return x * y

        self.assertIs(registry.get("old.mul"), mul.definition)
        self.assertIs(registry.get("guillotina_app.tasks.mul"), mul.definition)
        definition = registry.register(other, "jobs.other2", aliases=["old.other"])
        self.assertIs(registry.get("old.other"), definition)

    def test_a_failed_alias_leaves_nothing_registered(self):
        self.registry.register(other, "jobs.other")
        e = self.assertRaises(ConfigurationError, self.registry.register, kwonly, "jobs.sub",
                              aliases=("new.sub", "jobs.other"))
        self.assertIn("a task is registered as 'jobs.other'", str(e))
        self.assertNotIn("jobs.sub", self.registry)
        self.assertEqual(self.registry.aliases, {})

    def test_aliases_must_be_a_list(self):
        e = self.assertRaises(ConfigurationError, self.registry.register, kwonly, "jobs.sub",
                              aliases="old.sub")
        self.assertIn("must be a list of names", str(e))
