# -*- test-case-name: tests.test_cli -*-
"""
The ``quebert`` command: enqueue a task, read its state, list tasks.

(Over 700 lines: one short function per subcommand, beside the option
parsing and output they share.)

::

    quebert enqueue NAME [--args JSON] [--kwargs JSON] [--queue Q] ...
    quebert status TASK_ID [--no-tracebacks]
    quebert wait TASK_ID [--timeout S] [--record] [--no-tracebacks]
    quebert list [--state S] [--queue Q] [--limit N] [--no-tracebacks]
    quebert migrate-queue QUEUE... [--queue-type T] [--delivery-limit N]
    quebert drop-old-delays [--queue-type T]

Every command takes ``--amqp-url`` (``$QUEBERT_AMQP_URL``), ``--redis-url``
(``$QUEBERT_REDIS_URL``), ``--prefix`` (``$QUEBERT_PREFIX``), ``--exchange`` and
``--connect-timeout``, before or after the command name.

Output is for scripts: ``enqueue`` prints the task id alone, ``status`` a
record as indented JSON, ``list`` one compact JSON record per line,
``wait`` the task's result as JSON.  Exit codes: 0 done (``wait``: the task
succeeded), 1 error (one ``quebert: error: ...`` line on stderr), 2 bad
command line, 3 ``drop-old-delays`` found delay queues still holding tasks;
``wait`` only: 4 the task failed, 5 it was canceled, 6 ``--timeout`` passed
first.
Every wait on the network is bounded by ``--connect-timeout`` (but a
migration's moves, which take as long as the queue is long).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys
import traceback
from typing import Any, Awaitable, Callable, List, Optional, Sequence
from urllib.parse import urlsplit

from pika.exceptions import AMQPConnectionError
from twisted.internet import defer, task

from quebert.amqp.connection import DEFAULT_AMQP_URL
from quebert.amqp.migrate import QueueMigration
from quebert.amqp.topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_QUEUE_TYPE, QUEUE_TYPES
from quebert.client import Client
from quebert.config import DEFAULT_REDIS_URL
from quebert.errors import QuebertError, ResultTimeout, TaskCanceled, TaskFailed
from quebert.protocol import QUEUE_RE
from quebert.state._redis_ops import describe_redis_url
from quebert.state.interface import STATES

PROG = "quebert"
DEFAULT_PREFIX = "quebert:"
DEFAULT_EXCHANGE = "quebert"
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Keyword names ``Client.add_task`` keeps for itself.
_RESERVED_KWARGS = frozenset({"fn_or_name"})


class CommandError(Exception):
    """A failure to report as one ``quebert: error:`` line (exit code 1)."""


# -- argument types (argparse turns ArgumentTypeError into exit code 2) -------


def _json(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {value!r}")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def json_array(value: str) -> list:
    """``--args``: a JSON array."""
    decoded = _json(value)
    if not isinstance(decoded, list):
        raise argparse.ArgumentTypeError(
            f"must be a JSON array such as '[1, \"two\"]', not {_json_type(decoded)}")
    return decoded


def json_object(value: str) -> dict:
    """``--kwargs``: a JSON object whose keys can be Python keyword names."""
    decoded = _json(value)
    if not isinstance(decoded, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"key\": 1}}', not {_json_type(decoded)}")
    reserved = sorted(k for k in decoded if k.startswith("_") or k in _RESERVED_KWARGS)
    if reserved:
        raise argparse.ArgumentTypeError(
            f"key(s) {', '.join(map(repr, reserved))} cannot be sent: quebert keeps names "
            "starting with '_' (and 'fn_or_name') for its own task options")
    return decoded


def eta(value: str) -> float:
    """``--eta``: epoch seconds, or an ISO 8601 time with a UTC offset."""
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or number < 0:
            raise argparse.ArgumentTypeError(f"must be epoch seconds >= 0, not {value!r}")
        return number
    text = value.strip()
    if text[-1:] in ("Z", "z"):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be epoch seconds or an ISO 8601 time such as 2030-01-01T12:00:00Z, "
            f"not {value!r}")
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} has no UTC offset; add one (2030-01-01T12:00:00+02:00) or Z for UTC")
    return when.timestamp()


def _number(value: str, *, integer: bool = False) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise argparse.ArgumentTypeError(f"must be {kind}, not {value!r}")
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {value!r}")
    return number


def non_negative(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value!r}")
    return number


def positive(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {value!r}")
    return number


def positive_int(value: str) -> int:
    number = int(_number(value, integer=True))
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value!r}")
    return number


def attempts(value: str) -> int:
    number = int(_number(value, integer=True))
    if number == 0 or number < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (unlimited) or >= 1, not {value!r}")
    return number


# -- the parser ---------------------------------------------------------------


def _add_connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """
    The options every command takes.  They are given to the main parser
    with their defaults and to each sub-parser with ``SUPPRESS``, so they
    may come before or after the command name without the sub-parser's
    default overwriting a value given before it.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection options")
    group.add_argument(
        "--amqp-url", metavar="URL",
        default=default(os.environ.get("QUEBERT_AMQP_URL", DEFAULT_AMQP_URL)),
        help="RabbitMQ URL, or the URLs of a cluster's nodes separated by commas "
             f"[env QUEBERT_AMQP_URL, default {DEFAULT_AMQP_URL}]")
    group.add_argument(
        "--redis-url", metavar="URL",
        default=default(os.environ.get("QUEBERT_REDIS_URL", DEFAULT_REDIS_URL)),
        help=f"Redis URL of the task state [env QUEBERT_REDIS_URL, default {DEFAULT_REDIS_URL}]")
    group.add_argument("--prefix", metavar="PREFIX",
                       default=default(os.environ.get("QUEBERT_PREFIX", DEFAULT_PREFIX)),
                       help="key prefix of the task state in Redis "
                            f"[env QUEBERT_PREFIX, default {DEFAULT_PREFIX}]")
    group.add_argument("--exchange", metavar="NAME", default=default(DEFAULT_EXCHANGE),
                       help=f"main exchange [default {DEFAULT_EXCHANGE}]")
    group.add_argument("--connect-timeout", metavar="S", type=positive,
                       default=default(DEFAULT_CONNECT_TIMEOUT),
                       help="seconds to wait for RabbitMQ or Redis before giving up "
                       f"[default {DEFAULT_CONNECT_TIMEOUT:g}]")
    group.add_argument("-v", "--verbose", action="store_true", default=default(False),
                       help="log connection events and show tracebacks on stderr")


def _add_publish_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """The options ``enqueue`` and ``enqueue-url`` share: when, where, retries, state."""
    parser.add_argument("--queue", metavar="Q", help="work queue [default: default]")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--countdown", type=non_negative, metavar="S",
                      help=f"{verb} no sooner than S seconds from now")
    when.add_argument("--eta", type=eta, metavar="TIME",
                      help=f"{verb} no sooner than TIME: epoch seconds or ISO 8601 with offset")
    parser.add_argument("--name", metavar="UNIQUE", help="unique task name")
    parser.add_argument("--task-id", metavar="ID", help="task id [default: random]")
    parser.add_argument("--max-attempts", type=attempts, metavar="N",
                        help="attempts allowed, first included (-1: unlimited)")
    parser.add_argument("--min-backoff", type=non_negative, metavar="S",
                        help="delay before the first retry")
    parser.add_argument("--max-backoff", type=non_negative, metavar="S",
                        help="longest delay between retries")
    parser.add_argument("--no-state", action="store_true",
                        help="do not record the task in Redis")


def _retry_options(options: argparse.Namespace) -> dict:
    """The retry overrides given on the command line."""
    return {key: value for key, value in (
        ("max_attempts", options.max_attempts), ("min_backoff", options.min_backoff),
        ("max_backoff", options.max_backoff)) if value is not None}


def build_parser() -> argparse.ArgumentParser:
    """The ``quebert`` command line."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Enqueue quebert tasks and read their state.")
    _add_connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    enqueue = commands.add_parser(
        "enqueue", help="publish a task and print its id",
        description="Publish task NAME to RabbitMQ and print its id. The task does not "
                    "need to be importable here; a worker that registered NAME runs it.")
    enqueue.add_argument("task", metavar="NAME", help="registered task name")
    enqueue.add_argument("--args", type=json_array, default=[], metavar="JSON",
                         help="positional arguments, a JSON array")
    enqueue.add_argument("--kwargs", type=json_object, default={}, metavar="JSON",
                         help="keyword arguments, a JSON object")
    _add_publish_options(enqueue, "run")
    enqueue.add_argument("--timeout", type=positive, metavar="S",
                         help="seconds each attempt may run")
    _add_connection_options(enqueue, suppress=True)
    enqueue.set_defaults(run=cmd_enqueue)

    url = commands.add_parser(
        "enqueue-url", help="publish a URL task and print its id",
        description="Publish a URL task: a worker makes this HTTP request; any 2xx "
                    "answer is success, anything else is retried with backoff.")
    url.add_argument("url", metavar="URL", help="http or https URL to request")
    url.add_argument("--method", "-X", default="POST", metavar="METHOD",
                     help="HTTP method [default POST]")
    url.add_argument("--header", "-H", action="append", default=[], metavar="'NAME: VALUE'",
                     help="request header (repeatable)")
    body = url.add_mutually_exclusive_group()
    body.add_argument("--data", "-d", metavar="TEXT", help="request body (text)")
    body.add_argument("--data-file", metavar="FILE",
                      help="request body read from FILE (bytes; - for stdin)")
    _add_publish_options(url, "send")
    url.add_argument("--dispatch-deadline", type=positive, metavar="S",
                     help="seconds each request may take [default: the queue's, 600]")
    _add_connection_options(url, suppress=True)
    url.set_defaults(run=cmd_enqueue_url)

    for verb, helptext, target, metavar in (
        ("cancel", "cancel a task (a running one is stopped)", cmd_cancel, "TASK_ID"),
        ("requeue", "put a failed task back in its queue", cmd_requeue, "TASK_ID"),
        ("pause", "stop every worker taking tasks from a queue", cmd_pause, "QUEUE"),
        ("resume", "let workers take tasks from a paused queue again", cmd_resume, "QUEUE"),
    ):
        sub = commands.add_parser(verb, help=helptext, description=helptext[0].upper()
                                  + helptext[1:] + ".")
        sub.add_argument("target", metavar=metavar)
        _add_connection_options(sub, suppress=True)
        sub.set_defaults(run=target)

    status = commands.add_parser(
        "status", help="print the state record of a task",
        description="Print the state record of TASK_ID as JSON.")
    status.add_argument("task_id", metavar="TASK_ID")
    status.add_argument("--no-tracebacks", action="store_true",
                        help="leave the errors' tracebacks out (type and message stay)")
    _add_connection_options(status, suppress=True)
    status.set_defaults(run=cmd_status)

    waiting = commands.add_parser(
        "wait", help="wait for a task to finish and print its result",
        description="Wait until TASK_ID has finished, then print its result as JSON (exit 0), "
                    "or its error on stderr (exit 4: failed; 5: canceled).  Exit 6 when "
                    "--timeout passes first.  A task that finished already answers at once.")
    waiting.add_argument("task_id", metavar="TASK_ID")
    waiting.add_argument("--timeout", type=non_negative, default=None, metavar="S",
                         help="give up after S seconds (exit 6) [default: wait as long as "
                              "it takes]")
    waiting.add_argument("--record", action="store_true",
                         help="print the whole record as JSON instead of the result, "
                              "whatever the outcome (the exit code still tells it)")
    waiting.add_argument("--no-tracebacks", action="store_true",
                         help="leave the errors' tracebacks out (type and message stay)")
    _add_connection_options(waiting, suppress=True)
    waiting.set_defaults(run=cmd_wait)

    listing = commands.add_parser(
        "list", help="print state records, newest first",
        description="Print state records as JSON lines, most recently updated first.")
    listing.add_argument("--state", choices=STATES, help="only tasks in this state")
    listing.add_argument("--queue", metavar="Q", help="only tasks of this queue")
    listing.add_argument("--limit", type=positive_int, default=100, metavar="N",
                         help="at most N records [default %(default)s]")
    listing.add_argument("--no-tracebacks", action="store_true",
                         help="leave the errors' tracebacks out (type and message stay)")
    _add_connection_options(listing, suppress=True)
    listing.set_defaults(run=cmd_list)

    migrate = commands.add_parser(
        "migrate-queue", help="change existing work queues to another queue type, in place",
        description="Move work queue QUEUE (and QUEUE.errored) to --queue-type with the "
                    "arguments workers declare, keeping every message: it is emptied into "
                    "QUEUE.migrating (where new tasks land meanwhile), deleted, declared "
                    "anew and filled back. Stop the workers consuming QUEUE first. Run it "
                    "again to finish an interrupted migration (docs/topology.rst).")
    migrate.add_argument("queues", metavar="QUEUE", nargs="+")
    _add_queue_type_options(migrate)
    _add_connection_options(migrate, suppress=True)
    migrate.set_defaults(run=cmd_migrate_queue)

    drop = commands.add_parser(
        "drop-old-delays", help="delete the other queue type's delay queues once empty",
        description="Delete the delay queues and exchanges of the queue type the workers "
                    "no longer use (quebert 0.1 declared classic ones, quebert.delay.NN), "
                    "once every one of them is empty. Nothing is deleted while one holds "
                    "a task: exits 3 and lists them. Run it after every producer and "
                    "worker was upgraded.")
    _add_queue_type_options(drop)
    _add_connection_options(drop, suppress=True)
    drop.set_defaults(run=cmd_drop_old_delays)
    return parser


def _add_queue_type_options(parser: argparse.ArgumentParser) -> None:
    """The workers' --queue-type and --delivery-limit, for the commands that declare."""
    parser.add_argument("--queue-type", choices=QUEUE_TYPES, default=DEFAULT_QUEUE_TYPE,
                        help="the workers' --queue-type [default %(default)s]")
    parser.add_argument("--delivery-limit", type=int, default=DEFAULT_DELIVERY_LIMIT,
                        metavar="N", help="the workers' --delivery-limit, 0 for none "
                        "[default %(default)s]")


def _check(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Checks that involve more than one option."""
    if options.command == "enqueue-url":
        headers = {}
        for header in options.header:
            name, sep, value = header.partition(":")
            if not sep or not name.strip():
                parser.error(f"--header {header!r} must be 'NAME: VALUE'")
            headers[name.strip()] = value.strip()
        options.headers = headers
    if options.command in ("enqueue", "enqueue-url"):
        low, high = options.min_backoff, options.max_backoff
        if low is not None and high is not None and high < low:
            parser.error(f"--max-backoff ({high:g}) must be >= --min-backoff ({low:g})")


# -- bounded waits --------------------------------------------------------------


def _bounded(reactor: Any, waits: Sequence[defer.Deferred], seconds: float,
             message: str) -> defer.Deferred:
    """
    A Deferred of our own with the outcome of whichever of ``waits`` fires
    first, or failing with ``CommandError(message)`` after ``seconds``.

    Nothing in ``waits`` is cancelled (pika leaves a channel unusable when
    one of its Deferreds is); their later results are consumed here.
    """
    outcome: defer.Deferred = defer.Deferred()

    def expire() -> None:
        if not outcome.called:
            outcome.errback(CommandError(message))

    timer = reactor.callLater(seconds, expire)

    def deliver(result: Any) -> None:
        if outcome.called:
            return
        if isinstance(result, defer.Failure):
            outcome.errback(result)
        else:
            outcome.callback(result)

    def settle(result: Any) -> None:
        if timer.active():
            timer.cancel()
            # On a fresh stack: ``waits`` may fire from inside a state
            # machine transition (ClientService), which the caller's next
            # step (say, stopService) must not re-enter.
            reactor.callLater(0, deliver, result)
        return None

    for wait in waits:
        wait.addBoth(settle)
    return outcome


async def _quietly(reactor: Any, closing: Callable[[], Any], seconds: float) -> None:
    """Close something, giving up (silently) after ``seconds``."""
    try:
        await _bounded(reactor, [defer.maybeDeferred(closing)], seconds, "close timed out")
    except Exception:
        pass


def _where(url: str) -> str:
    """``host:port/vhost`` of a URL (or of each of several), without credentials."""
    if "," in url:
        return ", ".join(_where(u) for u in url.split(",") if u.strip())
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "?"
    return f"{host}:{port}{parts.path}" if port else f"{host}{parts.path}"


def _describe(error: BaseException) -> str:
    """An exception as one line of text."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


# -- state ----------------------------------------------------------------------


def _open_state(reactor: Any, options: argparse.Namespace):
    """``(redis, state manager)``; the connection is lazy (made in the background)."""
    from quebert.state.redis import RedisStateManager, connect_redis

    redis = connect_redis(options.redis_url, reactor=reactor)
    # The manager's own time limit is a backstop: the callers' shorter
    # bound fails first, with a message that says which Redis it was.
    return redis, RedisStateManager(redis, prefix=options.prefix, clock=reactor,
                                    timeout=options.connect_timeout + 1)


class _BackgroundRecorder:
    """
    The ``state=`` that ``enqueue`` gives its :class:`Client`.

    The Client records a task only once RabbitMQ confirmed it, and swallows
    a failed write.  This starts the write (bounded in time) and returns at
    once, so an unreachable Redis never delays or fails the publish;
    :meth:`problem` then waits for the write and says why it failed.
    """

    def __init__(self, state: Any, reactor: Any, timeout: float, where: str) -> None:
        self.state = state
        self.reactor = reactor
        self.timeout = timeout
        self.where = where
        self._writes: List[defer.Deferred] = []

    def enqueued(self, task_id: str, state: str, info: Any, at: float) -> defer.Deferred:
        write = defer.maybeDeferred(self.state.enqueued, task_id, state, info, at)
        self._writes.append(_bounded(
            self.reactor, [write], self.timeout,
            f"Redis at {self.where} did not answer within {self.timeout:g} s"))
        return defer.succeed(None)

    def claim(self, task_id: str, state: str, info: Any, at: float) -> defer.Deferred:
        """A unique name is checked before publishing: this one is waited for."""
        return _bounded(self.reactor, [defer.maybeDeferred(self.state.claim, task_id, state,
                                                           info, at)], self.timeout,
                        f"Redis at {self.where} did not answer within {self.timeout:g} s")

    def finished(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return defer.maybeDeferred(self.state.finished, *args, **kwargs)

    def release_name(self, *args: Any) -> defer.Deferred:
        return defer.maybeDeferred(self.state.release_name, *args)

    async def problem(self) -> Optional[str]:
        """``None`` once every write is stored, else why one was not."""
        for write in self._writes:
            try:
                await write
            except Exception as e:
                return _describe(e)
        return None


async def _ask_state(reactor: Any, options: argparse.Namespace,
                     query: Callable[[Any], Any]) -> Any:
    """Run ``query(state_manager)`` against Redis, bounded in time."""
    where = describe_redis_url(options.redis_url)
    redis, state = _open_state(reactor, options)
    try:
        return await _bounded(
            reactor, [defer.maybeDeferred(query, state)], options.connect_timeout,
            f"Redis at {where} did not answer within {options.connect_timeout:g} s")
    finally:
        await _quietly(reactor, redis.disconnect, 2.0)


# -- output ---------------------------------------------------------------------


def _print(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``quebert list | head``): nothing to tell
        # it, and nothing for Python to complain about when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _error(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    sys.stderr.flush()


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")
    sys.stderr.flush()


# -- commands -------------------------------------------------------------------


async def _wait_connected(reactor: Any, client: Client, options: argparse.Namespace) -> None:
    """
    Wait until the client's connection is ready: fail with the reason at the
    first failed attempt, or after ``--connect-timeout`` if attempts hang.
    """
    where = _where(options.amqp_url)
    # Fail at the first failed attempt, so "connection refused" says so at once.
    ready = client.whenConnected(fail_after_failures=1)
    try:
        await _bounded(
            reactor, [ready], options.connect_timeout,
            f"could not connect to RabbitMQ at {where} within {options.connect_timeout:g} s")
    except CommandError:
        raise
    except AMQPConnectionError:
        # pika's Twisted adapter drops the broker's reason (its message is
        # just the number of attempts); name what usually causes it.
        raise CommandError(
            f"cannot connect to RabbitMQ at {where}: the broker ended the AMQP handshake "
            "(check the user name, password and vhost of --amqp-url)")
    except Exception as e:
        raise CommandError(f"cannot connect to RabbitMQ at {where}: {_describe(e)}")


async def cmd_enqueue(reactor: Any, options: argparse.Namespace) -> int:
    """Publish one task; print its id."""
    retry = _retry_options(options)

    def add(client: Client) -> defer.Deferred:
        return client.add_task(
            options.task, *options.args, _queue=options.queue,
            _countdown=options.countdown, _eta=options.eta, _name=options.name,
            _task_id=options.task_id, _timeout=options.timeout, _retry=retry,
            **options.kwargs)

    return await _publish(reactor, options, add)


async def _publish(reactor: Any, options: argparse.Namespace,
                   add: Callable[[Client], defer.Deferred]) -> int:
    """Publish with ``add(client)`` and print the task id."""
    redis = recorder = None
    if not options.no_state:
        redis, state = _open_state(reactor, options)
        recorder = _BackgroundRecorder(state, reactor, options.connect_timeout,
                                       describe_redis_url(options.redis_url))
    try:
        client = Client(options.amqp_url, reactor=reactor, state=recorder,
                        exchange=options.exchange)
        try:
            # Checks every option before anything touches the network.
            sent = add(client)
        except BaseException:
            await _quietly(reactor, client.close, 5.0)
            raise
        try:
            await _wait_connected(reactor, client, options)
            info = await _bounded(
                reactor, [sent], options.connect_timeout,
                f"RabbitMQ did not confirm the task within {options.connect_timeout:g} s; "
                "it may or may not have been queued")
        finally:
            sent.addErrback(lambda _: None)
            await _quietly(reactor, client.close, 5.0)
        if recorder is not None:
            problem = await recorder.problem()
            if problem is not None:
                _warn(f"task {info.id} is queued but its state was not recorded: {problem}")
    finally:
        if redis is not None:
            await _quietly(reactor, redis.disconnect, 2.0)
    _print(info.id)
    return 0


async def cmd_enqueue_url(reactor: Any, options: argparse.Namespace) -> int:
    """Publish one URL task; print its id."""
    if options.data_file is not None:
        if options.data_file == "-":
            body = sys.stdin.buffer.read()
        else:
            try:
                with open(options.data_file, "rb") as f:
                    body = f.read()
            except OSError as e:
                raise CommandError(f"cannot read --data-file: {e}")
    else:
        body = (options.data or "").encode("utf-8")
    retry = _retry_options(options)

    def add(client: Client) -> defer.Deferred:
        return client.add_url_task(
            options.url, method=options.method, headers=options.headers, body=body,
            queue=options.queue, countdown=options.countdown, eta=options.eta,
            name=options.name, task_id=options.task_id, retry=retry,
            dispatch_deadline=options.dispatch_deadline)

    return await _publish(reactor, options, add)


async def _with_client(reactor: Any, options: argparse.Namespace,
                       action: Callable[[Client], Any]) -> Any:
    """Run ``action(client)`` with a Client that has the Redis state store."""
    redis, state = _open_state(reactor, options)
    client = Client(options.amqp_url, reactor=reactor, state=state, exchange=options.exchange)
    try:
        await _wait_connected(reactor, client, options)
        return await _bounded(
            reactor, [defer.ensureDeferred(defer.maybeDeferred(action, client))],
            options.connect_timeout * 3,
            f"no answer within {options.connect_timeout * 3:g} s")
    finally:
        await _quietly(reactor, client.close, 5.0)
        await _quietly(reactor, redis.disconnect, 2.0)


async def cmd_cancel(reactor: Any, options: argparse.Namespace) -> int:
    """Cancel a task; print its record."""
    record = await _with_client(reactor, options, lambda c: c.cancel(options.target))
    _print(json.dumps(record, indent=2, sort_keys=True, default=str))
    return 0


async def cmd_requeue(reactor: Any, options: argparse.Namespace) -> int:
    """Requeue a failed task; print its record."""
    record = await _with_client(reactor, options, lambda c: c.requeue(options.target))
    _print(json.dumps(record, indent=2, sort_keys=True, default=str))
    return 0


async def cmd_pause(reactor: Any, options: argparse.Namespace) -> int:
    await _with_client(reactor, options, lambda c: c.pause(options.target))
    _print(f"paused {options.target}")
    return 0


async def cmd_resume(reactor: Any, options: argparse.Namespace) -> int:
    await _with_client(reactor, options, lambda c: c.resume(options.target))
    _print(f"resumed {options.target}")
    return 0


async def cmd_status(reactor: Any, options: argparse.Namespace) -> int:
    """Print one task's record."""
    record = await _ask_state(reactor, options, lambda state: state.get(options.task_id))
    if record is None:
        _error(f"no such task: {options.task_id}")
        return 1
    if options.no_tracebacks:
        record = _without_tracebacks(record)
    _print(json.dumps(record, indent=2, sort_keys=True, default=str))
    return 0


#: ``quebert wait``'s exit codes beyond 0-2.
EXIT_FAILED = 4
EXIT_CANCELED = 5
EXIT_TIMEOUT = 6


async def cmd_wait(reactor: Any, options: argparse.Namespace) -> int:
    """Wait for a task to finish; print its result or error, exit per outcome."""
    from quebert.results import ResultWaiter

    where = describe_redis_url(options.redis_url)
    redis, state = _open_state(reactor, options)
    waiter = ResultWaiter(state, reactor)
    try:
        # Redis answers within --connect-timeout, or the command says so:
        # the wait itself reconnects for as long as it lasts
        record = await _bounded(
            reactor, [state.get(options.task_id)], options.connect_timeout,
            f"Redis at {where} did not answer within {options.connect_timeout:g} s")
        if record is None:
            _error(f"no such task: {options.task_id}")
            return 1
        try:
            record = await waiter.wait(options.task_id, options.timeout)
        except ResultTimeout as e:
            _error(str(e))
            return EXIT_TIMEOUT
    finally:
        await _quietly(reactor, waiter.close, 2.0)
        await _quietly(reactor, redis.disconnect, 2.0)
    if options.no_tracebacks:
        record = _without_tracebacks(record)
    if options.record:
        _print(json.dumps(record, indent=2, sort_keys=True, default=str))
    state_name = record["state"]
    if state_name == "succeeded":
        if not options.record:
            _print(json.dumps(record.get("result"), sort_keys=True, default=str))
        return 0
    if state_name == "canceled":
        _error(str(TaskCanceled(options.task_id, record)))
        return EXIT_CANCELED
    failed = TaskFailed(options.task_id, record)
    _error(str(failed) + (f" ({failed.reason})" if failed.reason else ""))
    if failed.traceback and not options.record:
        sys.stderr.write(failed.traceback.rstrip("\n") + "\n")
    return EXIT_FAILED


async def _with_migration(reactor: Any, options: argparse.Namespace,
                          action: Callable[[QueueMigration], Any]) -> Any:
    """Run ``action(migration)`` over a client's connection, without a time bound."""
    if options.delivery_limit < 0:
        raise CommandError(f"--delivery-limit must be 0 or more, not {options.delivery_limit}")
    client = Client(options.amqp_url, reactor=reactor, exchange=options.exchange,
                    queue_type=options.queue_type,
                    delivery_limit=options.delivery_limit or None)
    try:
        await _wait_connected(reactor, client, options)
        publisher = client.broker.publisher
        migration = QueueMigration(client.broker.publishing, client.topology,
                                   lambda *a: publisher.publish(*a, mandatory=True),
                                   progress=_print)
        return await action(migration)
    finally:
        await _quietly(reactor, client.close, 5.0)


async def cmd_migrate_queue(reactor: Any, options: argparse.Namespace) -> int:
    """Migrate each named queue; print what was done."""
    for queue in options.queues:
        if not QUEUE_RE.fullmatch(queue):
            raise CommandError(f"{queue!r} is not a valid queue name")

    async def run(migration: QueueMigration) -> None:
        for queue in options.queues:
            await migration.migrate(queue)

    await _with_migration(reactor, options, run)
    return 0


async def cmd_drop_old_delays(reactor: Any, options: argparse.Namespace) -> int:
    """Delete the other type's delay levels, or list those still holding tasks (exit 2)."""
    waiting = await _with_migration(reactor, options, lambda m: m.drop_other_delays())
    if waiting:
        for name, count in sorted(waiting.items()):
            _print(f"{name}: {count} task(s) still waiting")
        _error("nothing deleted: delay queues still hold tasks; run it again once they "
               "drained (at most their longest delay)")
        return 3
    return 0


def _without_tracebacks(record: dict) -> dict:
    """``record`` with no ``traceback`` in its error or its history's errors."""
    def bare(error: Any) -> Any:
        if isinstance(error, dict) and "traceback" in error:
            return {k: v for k, v in error.items() if k != "traceback"}
        return error

    record = dict(record, error=bare(record.get("error")))
    if record.get("history"):
        record["history"] = [dict(entry, error=bare(entry.get("error")))
                             if isinstance(entry, dict) else entry
                             for entry in record["history"]]
    return record


async def cmd_list(reactor: Any, options: argparse.Namespace) -> int:
    """Print records as JSON lines, most recently updated first."""
    records = await _ask_state(reactor, options, lambda state: state.list(
        state=options.state, queue=options.queue, limit=options.limit))
    for record in records:
        if options.no_tracebacks:
            record = _without_tracebacks(record)
        _print(json.dumps(record, separators=(",", ":"), sort_keys=True, default=str))
    return 0


# -- running ----------------------------------------------------------------------


Command = Callable[[Any, argparse.Namespace], Awaitable[int]]


async def _run(reactor: Any, options: argparse.Namespace) -> None:
    command: Command = options.run
    try:
        code = await command(reactor, options)
    except (CommandError, QuebertError) as e:
        _error(_describe(e))
        code = 1
    except Exception as e:
        if options.verbose:
            traceback.print_exc()
        _error(f"{type(e).__name__}: {_describe(e)}")
        code = 1
    if code:
        raise SystemExit(code)


def _configure_logging(verbose: bool) -> None:
    """
    Quiet by default: the one-line errors say what went wrong, and neither
    pika (stdlib logging) nor Twisted (critical events before logging
    starts) may print a traceback of their own.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    observers: List[Any] = []
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        observers.append(FilteringLogObserver(
            textFileLogObserver(sys.stderr),
            [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]))
    else:
        logging.getLogger().addHandler(logging.NullHandler())
        logging.getLogger("pika").propagate = False
        logging.getLogger("pika").addHandler(logging.NullHandler())
    globalLogBeginner.beginLoggingTo(observers, discardBuffer=True,
                                     redirectStandardIO=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``quebert`` console script; exits the process."""
    parser = build_parser()
    options = parser.parse_args(argv)
    _check(parser, options)
    _configure_logging(options.verbose)
    task.react(_run, (options,))


if __name__ == "__main__":
    main()
