# -*- test-case-name: tests.test_watchdog -*-
"""
The reactor-stall watchdog (``--auto-kill-timeout SECONDS``).

A ``LoopingCall`` on the reactor notes the (monotonic) time of each of its
ticks, every ``timeout / 4`` seconds; a daemon thread looks at that time.
An idle reactor still runs its timed calls, so only a reactor that is
stuck (a task blocking it, an endless loop, a deadlock) misses ticks.  When
none came for ``timeout`` seconds the thread, alone able to act:

1. reports the reactor thread's Python stack and the running tasks (ids,
   names, attempts) on standard error, written with ``os.write`` on file
   descriptor 2, and as a ``critical`` ``twisted.logger`` event, which the
   twistd log observers write synchronously in the calling thread (the
   log file).  twisted.logger has no lock of its own; the reactor thread
   is stuck, so it is not writing at the same time, and if it is stuck
   *inside* a write, the file object's own lock makes this thread wait,
   which is why step 3 does not wait for the report for long;
2. marks each running task's state record as stalled, straight in Redis:
   the reactor cannot run txredisapi any more, so a tiny synchronous RESP
   client sends one ``EVAL`` over a plain socket with a short timeout.
   When the message is redelivered, the mediator finds the mark for that
   attempt and counts it as :class:`~quebert.errors.ReactorStalled` instead
   of a plain ``WorkerLost``;
3. after at most ``report_budget`` seconds for 1 and 2 (they run in
   helper threads: a stuck log file or Redis must not keep a stalled
   worker alive), exits the process with ``os._exit(exit_code)``: a clean
   shutdown needs the reactor.  Unacked messages go back to RabbitMQ when
   the connections die with the process; the attempt counts were written
   before the tasks started, so a task that stalls every worker it runs on
   ends in the errored queue once its attempts are spent.

Limits: a stall that holds the GIL (C code that does not release it) stops
the watchdog thread too; AMQP heartbeats (and the liveness beacon) cover
that case from the outside.
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, Mapping, Optional

import attrs
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from quebert.exitcodes import EXIT_REACTOR_STALLED

log = Logger(namespace="quebert.watchdog")

#: Seconds the report (log lines, Redis marks) may take before the exit.
REPORT_BUDGET = 2.0
#: Longest stack text reported (its end is kept: the innermost frames).
STACK_LIMIT = 20000


@attrs.frozen
class Stall:
    """What the watchdog reports of one running task."""

    id: str
    name: str
    attempt: int
    queue: Optional[str] = None
    #: The task's function is on the reactor thread's stack (it blocks the
    #: reactor); ``False`` if another task's is; ``None``: cannot tell.
    culprit: Optional[bool] = None


def _code_of(fn: Any) -> Any:
    """The code object a frame of ``fn`` runs (``None`` when it has none)."""
    try:
        fn = inspect.unwrap(fn)
    except Exception:
        pass
    return getattr(fn, "__code__", None)


def snapshot_running(running: Mapping[str, Any], frame: Any = None) -> list[Stall]:
    """
    The running tasks of a mediator (``Mediator.running``), read from
    another thread: the dict is copied defensively (a reactor that is only
    slow may still change it meanwhile).  ``frame`` is the reactor thread's
    innermost frame, to tell which task's function blocks it.
    """
    tasks: list = []
    for _ in range(10):
        try:
            tasks = list(running.values())
            break
        except RuntimeError:  # changed size during iteration
            continue
    codes = set()
    while frame is not None:
        codes.add(frame.f_code)
        frame = frame.f_back
    found = {}
    for task in tasks:
        code = _code_of(getattr(getattr(task, "definition", None), "fn", None))
        found[task.id] = code is not None and code in codes
    anyone = any(found.values())
    stalls = []
    for task in tasks:
        culprit = found.get(task.id) if anyone else None
        stalls.append(Stall(id=str(task.id), name=str(getattr(task, "name", "?")),
                            attempt=int(getattr(task, "attempt", 0) or 0),
                            queue=getattr(task, "queue", None), culprit=culprit))
    return stalls


# -- marking the state records in Redis, without the reactor --------------

#: KEYS: the tasks' hashes; ARGV: at, stalled_for, then attempt and culprit
#: per key.  A record is marked only if it exists and its latest attempt is
#: the one that was running, so a mark never creates a half record.
_MARK = """
local marked = 0
for i, key in ipairs(KEYS) do
  local attempt = ARGV[2 * i + 1]
  if tonumber(redis.call('HGET', key, 'attempts')) == tonumber(attempt) then
    redis.call('HSET', key, 'stalled_attempt', attempt, 'stalled_at', ARGV[1],
               'stalled_for', ARGV[2], 'stalled_culprit', ARGV[2 * i + 2])
    marked = marked + 1
  end
end
return marked
"""


def _resp(*args: Any) -> bytes:
    """One Redis command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(stream: Any) -> Any:
    """One RESP reply from a binary file object; an error reply raises."""
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode("utf-8", "replace")
    if kind == b"-":
        raise RuntimeError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)
        return data[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read_reply(stream) for _ in range(size)]
    raise ConnectionError(f"unexpected Redis reply {line[:50]!r}")


class RedisStallMarker:
    """
    Marks task records as stalled with a blocking, one-shot Redis client
    (``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs as for the
    state store: through Sentinel, the sentinels are asked for the primary
    one after the other, within the same time budget).
    """

    def __init__(self, redis_url: str, prefix: str) -> None:
        from quebert.state.redis import parse_redis_url

        self.options = parse_redis_url(redis_url)
        self.prefix = prefix

    def mark(self, stalls: Iterable[Stall], at: float, stalled_for: float,
             timeout: float = 1.0) -> int:
        """Write the marks within ``timeout`` seconds; the number of records marked."""
        stalls = list(stalls)
        if not stalls:
            return 0
        deadline = time.monotonic() + timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no answer from Redis within {timeout}s")
            return remaining

        options = self.options
        if options.get("sentinels"):
            host, port = self._primary(left)
        else:
            host, port = options["host"], options["port"]
        sock = socket.create_connection((host, port), timeout=left())
        try:
            if options["tls"]:
                import ssl

                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=host)
            stream = sock.makefile("rb")
            commands = []
            if options["password"] is not None:
                commands.append(("AUTH", options["username"], options["password"])
                                if options["username"] else ("AUTH", options["password"]))
            if options["db"]:
                commands.append(("SELECT", options["db"]))
            args: list = []
            for stall in stalls:
                args += [stall.attempt, {True: "1", False: "0"}.get(stall.culprit, "")]
            commands.append(("EVAL", _MARK, len(stalls),
                             *[f"{self.prefix}task:{s.id}" for s in stalls],
                             float.__repr__(float(at)), float.__repr__(float(stalled_for)),
                             *args))
            reply: Any = None
            for command in commands:
                sock.settimeout(left())
                sock.sendall(_resp(*command))
                reply = _read_reply(stream)
            return int(reply)
        finally:
            sock.close()

    def _primary(self, left: Callable[[], float]) -> tuple:
        """
        ``(host, port)`` of the primary, from the first sentinel that names
        one (``SENTINEL get-master-addr-by-name``); ``left()`` bounds each step.
        """
        options = self.options
        errors = []
        for host, port in options["sentinels"]:
            try:
                sock = socket.create_connection((host, port), timeout=left())
            except OSError as e:
                errors.append(f"{host}:{port}: {e}")
                continue
            try:
                stream = sock.makefile("rb")
                commands: list = []
                if options["sentinel_password"] is not None:
                    commands.append(("AUTH", options["sentinel_password"]))
                commands.append(("SENTINEL", "get-master-addr-by-name", options["service"]))
                reply: Any = None
                for command in commands:
                    sock.settimeout(left())
                    sock.sendall(_resp(*command))
                    reply = _read_reply(stream)
                if isinstance(reply, list) and len(reply) == 2:
                    return reply[0].decode(), int(reply[1])
                errors.append(f"{host}:{port}: no primary for {options['service']!r}")
            except TimeoutError:
                raise
            except (OSError, RuntimeError, ValueError) as e:
                errors.append(f"{host}:{port}: {e}")
            finally:
                sock.close()
        raise ConnectionError("no sentinel named the primary: " + "; ".join(errors))


# -- the watchdog --------------------------------------------------------------


def _stderr(text: str) -> None:
    """Write to file descriptor 2 directly (twistd may have replaced ``sys.stderr``)."""
    data = text.encode("utf-8", "replace")
    while data:
        written = os.write(2, data)
        data = data[written:]


class ReactorWatchdog(Service):
    """
    Exits the process when the reactor has not ticked for ``timeout``
    seconds (see the module docstring).

    :param timeout: seconds without a tick that count as a stall.
    :param clock: ``IReactorTime`` the ticks run on (the reactor).
    :param running: returns the mediator's ``running`` mapping (task id to
        :class:`~quebert.mediator.Task`).
    :param marker: marks the running tasks' records (``mark(stalls, at,
        stalled_for, timeout)``); ``None`` when state is not in Redis.
    :param monotonic: the clock ticks and checks compare (``time.monotonic``).
    :param wall: epoch time for the stall marks (``time.time``).
    :param exit: ends the process with a status (``os._exit``).
    :param write: writes a text to standard error.
    :param thread: start the checking thread (tests call :meth:`check`).
    """

    name = "reactor-watchdog"

    def __init__(self, timeout: float, *, clock: Any,
                 running: Callable[[], Mapping[str, Any]] = dict,
                 marker: Any = None, exit_code: Optional[int] = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 exit: Callable[[int], Any] = os._exit,
                 write: Callable[[str], Any] = _stderr,
                 report_budget: float = REPORT_BUDGET, thread: bool = True) -> None:
        if not timeout > 0:
            raise ValueError(f"the watchdog timeout must be > 0 seconds, not {timeout!r}")
        if exit_code is None:
            exit_code = EXIT_REACTOR_STALLED
        self.timeout = float(timeout)
        #: Seconds between two ticks, and between two checks.
        self.interval = self.timeout / 4
        self.clock = clock
        self.running_tasks = running
        self.marker = marker
        self.exit_code = exit_code
        self._monotonic = monotonic
        self._wall = wall
        self._exit = exit
        self._write = write
        self.report_budget = report_budget
        self._use_thread = thread
        self.last_tick = self._last_check = monotonic()
        #: The thread ticks run in (the reactor's), known after the first tick.
        self.reactor_thread: Optional[int] = None
        self.fired = False
        self._loop: Optional[LoopingCall] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def startService(self) -> None:
        super().startService()
        self.last_tick = self._last_check = self._monotonic()
        self._stop.clear()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("the reactor watchdog's tick failed", f))
        if self._use_thread:
            self._thread = threading.Thread(target=self._watch, name="quebert-watchdog",
                                            daemon=True)
            self._thread.start()
        log.info("reactor watchdog on: exit code {code} if the reactor stalls for "
                 "{timeout}s", code=self.exit_code, timeout=self.timeout)

    def stopService(self) -> None:
        super().stopService()
        self._stop.set()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        # Only assignments: nothing here can raise and stop the LoopingCall.
        self.last_tick = self._monotonic()
        self.reactor_thread = threading.get_ident()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            if self.check():
                return

    def check(self) -> bool:
        """
        Fire if the reactor has not ticked for ``timeout`` seconds; whether
        it fired.  Called every ``interval`` seconds: when the previous
        check is much older than that, this thread did not run either, so
        the whole process was paused (SIGSTOP, a frozen container, a
        suspended VM), not the reactor alone; the reactor then gets another
        interval to tick before anything is taken for a stall.
        """
        if not self.running or self.fired:
            return False
        now = self._monotonic()
        previous, self._last_check = self._last_check, now
        if now - previous > self.interval + self.timeout / 2:
            return False
        stalled_for = now - self.last_tick
        if stalled_for < self.timeout:
            return False
        self.fired = True
        self.fire(stalled_for)
        return True

    def fire(self, stalled_for: float) -> None:
        """Report the stall, mark the running tasks, exit (whatever the report does)."""
        try:
            self._report_and_mark(stalled_for)
        finally:
            self._exit(self.exit_code)

    def _report_and_mark(self, stalled_for: float) -> None:
        ident = self.reactor_thread or threading.main_thread().ident
        frame = sys._current_frames().get(ident) if ident is not None else None
        stack = "".join(traceback.format_stack(frame))[-STACK_LIMIT:] if frame else \
            "(the reactor thread's stack is not available)\n"
        try:
            stalls = snapshot_running(self.running_tasks(), frame)
        except Exception as e:
            stalls = []
            stack += f"(the running tasks cannot be read: {e!r})\n"
        del frame
        at = self._wall()
        helpers = [threading.Thread(target=self._report, args=(stalled_for, stack, stalls),
                                    name="quebert-watchdog-report", daemon=True)]
        if self.marker is not None and stalls:
            helpers.append(threading.Thread(target=self._mark, args=(stalls, at, stalled_for),
                                            name="quebert-watchdog-mark", daemon=True))
        # real time: these are real threads, whatever clock the stall is measured on
        deadline = time.monotonic() + self.report_budget
        for helper in helpers:
            helper.start()
        for helper in helpers:
            helper.join(max(0.0, deadline - time.monotonic()))

    def _report(self, stalled_for: float, stack: str, stalls: list[Stall]) -> None:
        tasks = ", ".join(
            f"{s.id} ({s.name}, attempt {s.attempt}"
            + {True: ", blocking the reactor", False: "", None: ""}[s.culprit] + ")"
            for s in stalls) or "none"
        text = (f"quebert watchdog: the reactor has not run for {stalled_for:.1f}s "
                f"(--auto-kill-timeout {self.timeout:g}); exiting with status "
                f"{self.exit_code}.\nRunning tasks: {tasks}\n"
                f"Reactor thread stack (most recent call last):\n{stack}")
        try:
            self._write(text)
        except Exception:
            pass
        try:
            log.critical(
                "the reactor has not run for {stalled_for:.1f}s (auto-kill timeout "
                "{timeout}s); exiting with status {code}. Running tasks: {tasks}\n"
                "Reactor thread stack (most recent call last):\n{stack}",
                stalled_for=stalled_for, timeout=self.timeout, code=self.exit_code,
                tasks=tasks, stack=stack, task_ids=[s.id for s in stalls],
            )
        except Exception:
            pass

    def _mark(self, stalls: list[Stall], at: float, stalled_for: float) -> None:
        try:
            marked = self.marker.mark(stalls, at, stalled_for,
                                      timeout=max(0.1, self.report_budget * 0.75))
        except Exception as e:
            text = f"could not mark the stalled tasks in Redis: {e!r}"
        else:
            text = f"marked {marked} of {len(stalls)} task record(s) as stalled"
        try:
            self._write(f"quebert watchdog: {text}\n")
            log.warn("{text}", text=text)
        except Exception:
            pass
