"""
Importing quebert installs no Twisted reactor.

An application picks its reactor after its imports
(``asyncioreactor.install()`` fails with ``ReactorAlreadyInstalledError``
once anything imported ``twisted.internet.reactor``), and the Guillotina
bridge runs in an asyncio process that never runs Twisted.  Each check
runs in a fresh interpreter, since this one has a reactor already.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Appended to every script: fails (and says who imported it) if the reactor got in.
NO_REACTOR = textwrap.dedent("""
    import sys
    if "twisted.internet.reactor" in sys.modules:
        raise SystemExit("twisted.internet.reactor was imported")
    print("OK")
""")

#: Modules, and uses of them, that must leave the reactor alone.
IMPORTS = (
    "import quebert",
    "import quebert.registry",
    "import quebert.protocol",
    "import quebert.legacy",
    "import quebert.retry",
    "import quebert.errors",
    "import quebert.current",
    "import quebert.amqp.topology",
    "import quebert.amqp.control",
    "import quebert.interfaces",
    "import quebert.mediator",
    "import quebert.testing",
    "import quebert.state",
    "from quebert.state import MemoryStateManager, ResilientStateManager",
    "from quebert import task, current_task, Registry, RetryPolicy, QuebertError",
    "from quebert import Mediator, Hook, IBroker, IStateManager",
    # Client builds its connections (and so imports pika's Twisted
    # adapter) only when it is instantiated.
    "from quebert import Client",
    "import quebert\nfor name in quebert.__all__:\n    getattr(quebert, name)",
    "from quebert import *",
)


def run(script: str) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter, from the source tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


class NoReactorTests(SynchronousTestCase):
    def assertNoReactor(self, script: str) -> None:
        done = run(script + "\n" + NO_REACTOR)
        self.assertEqual((done.returncode, done.stdout.strip()[-2:]), (0, "OK"),
                         f"{script}\n{done.stdout}{done.stderr}")

    def test_imports(self) -> None:
        for script in IMPORTS:
            self.assertNoReactor(script)

    def test_redis_state_manager_is_the_one_that_needs_it(self) -> None:
        """The check above would pass vacuously if nothing ever imported the reactor."""
        done = run("import quebert.state\nquebert.state.RedisStateManager\n" + NO_REACTOR)
        self.assertIn("twisted.internet.reactor was imported", done.stderr)

    def test_asyncio_reactor_installed_after_import(self) -> None:
        """The application's reactor choice comes after ``import quebert``."""
        done = run(textwrap.dedent("""
            import quebert
            from quebert import Client, task
            from quebert import protocol

            from twisted.internet import asyncioreactor
            asyncioreactor.install()
            from twisted.internet import reactor
            assert type(reactor).__name__ == "AsyncioSelectorReactor", reactor

            @task(name="app.add", queue="default")
            def add(a, b):
                return a + b

            message, body = protocol.build("app.add", (1, 2), queue="default")
            assert protocol.decode(protocol.dumps(message.to_body())).args == (1, 2)
            assert add.run(1, 2) == 3
            print("OK")
        """))
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "OK"),
                         done.stdout + done.stderr)


_BRIDGE_DEPENDENCIES = ("guillotina", "aio_pika", "redis")


class GuillotinaBridgeTests(SynchronousTestCase):
    """The bridge, imported and used in an asyncio process, as Guillotina runs it."""

    if not all(importlib.util.find_spec(name) for name in _BRIDGE_DEPENDENCIES):
        skip = "needs the guillotina extra (guillotina, aio-pika, redis)"

    def test_bridge(self) -> None:
        done = run(textwrap.dedent('''
            import asyncio

            import quebert.bridge.guillotina
            from quebert.amqp import control
            from quebert.bridge.guillotina import (
                add_task, add_url_task, auth, permissions, services, subscribers, task)
            from quebert.bridge.guillotina.bridge import Bridge, set_bridge
            from quebert.bridge.guillotina.settings import BridgeSettings
            from quebert.bridge.guillotina.state import BridgeState

            class FakePublisher:
                def __init__(self):
                    self.sent = []

                async def connect(self):
                    pass

                async def close(self):
                    pass

                async def publish(self, queue, body, headers, *, message_id, delay=0.0):
                    self.sent.append((queue, message_id))

                async def publish_control(self, command, **fields):
                    self.sent.append(("control", control.encode(command, **fields)))

            class FakeRedis:
                """Every apply answers "the task was queued" for its first write."""

                def register_script(self, source):
                    async def script(keys, args):
                        return [0, 1, "queued"]
                    return script

                async def aclose(self):
                    pass

            @task(name="app.touch", queue="q")
            def touch(path):
                return path

            async def main():
                publisher = FakePublisher()
                bridge = Bridge(BridgeSettings.from_mapping({"callback_url": "http://app"}),
                                publisher=publisher, state=BridgeState(FakeRedis()))
                set_bridge(bridge)
                await add_task(touch, "/a")
                await touch("/b")
                await add_task("app.touch", "/c", _name="unique")
                await add_url_task("/db/c1/@hook", body={"a": 1})
                await bridge.cancel("some-task")
                await bridge.close()
                assert len(publisher.sent) == 5, publisher.sent

            asyncio.run(main())
        ''') + NO_REACTOR)
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "OK"),
                         done.stdout + done.stderr)
