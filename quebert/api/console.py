# -*- test-case-name: tests.test_console -*-
"""
The operator's console, server side: :class:`ConsoleFeed`, the live
overview every open console receives, and the static files of the page.

One feed per server.  While at least one console is connected, it asks the
task service for an overview once a second (queues and their depths, the
live workers' beats, the records per state), works out the rates, and
sends the same snapshot to every console as a server-sent event.  A
thousand open consoles cost the state store and the broker what one does.
With none connected it does nothing.

Rates are taken over the last ``window`` seconds.  Tasks out (attempts
that ended) and failures (attempts failed or retried) come from the
counters each worker puts in its beat: the difference between two
snapshots of the same worker, summed over workers, so that a worker that
appears or disappears changes no rate.  Tasks in are what the queue's
backlog (ready, running and delayed) grew by, plus what went out: what
arrived, by conservation, without asking the broker for publish rates.

The page itself (``quebert/api/ui/``) is plain HTML, CSS and JavaScript
modules shipped in the package: no CDN, no build step, and a strict
Content-Security-Policy (no inline script or style).
"""

from __future__ import annotations

import collections
import importlib.resources
import json
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from quebert._version import __version__

log = Logger(namespace="quebert.api.console")

#: Seconds between two snapshots.
INTERVAL = 1.0
#: Seconds of snapshots the rates are computed over.
WINDOW = 10.0

#: The page's files and their content types; nothing else is served.
ASSETS: Mapping[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "views.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

#: Headers of every console file: nothing runs but the page's own modules,
#: nothing loads from elsewhere, the page cannot be framed.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}

_OUT = ("succeeded", "failed", "canceled", "retried")
_FAILURES = ("failed", "retried")


def asset(name: str) -> Optional[Tuple[bytes, str]]:
    """The bytes and content type of a console file, or ``None``."""
    content_type = ASSETS.get(name)
    if content_type is None:
        return None
    return importlib.resources.files("quebert.api").joinpath("ui", name).read_bytes(), \
        content_type


def event(name: str, data: Any) -> bytes:
    """One server-sent event."""
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False, default=str)
    return f"event: {name}\ndata: {payload}\n\n".encode()


class ConsoleFeed:
    """
    Snapshots of ``service`` (an
    :class:`~quebert.api.interfaces.ITaskService`), every ``interval``
    seconds while anyone listens, to every listener.

    :param clock: ``IReactorTime`` (and the time of the snapshots).
    """

    def __init__(self, service: Any, clock: Any, interval: float = INTERVAL,
                 window: float = WINDOW) -> None:
        self.service = service
        self.clock = clock
        self.interval = interval
        self.window = window
        self.listeners: List[Callable[[bytes], None]] = []
        self.latest: Optional[bytes] = None
        self._loop: Optional[LoopingCall] = None
        self._busy = False
        #: (time, {worker: {queue: {counter: n}}}, {queue: backlog}), oldest first
        self._samples: Deque[Tuple[float, Dict[str, Any], Dict[str, int]]] = \
            collections.deque()

    def subscribe(self, listener: Callable[[bytes], None]) -> Callable[[], None]:
        """
        Send ``listener`` every snapshot (the latest one at once, if there
        is one); returns the function that stops it.
        """
        self.listeners.append(listener)
        if self.latest is not None:
            listener(self.latest)
        if self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=True)

        def stop() -> None:
            if listener in self.listeners:
                self.listeners.remove(listener)
            if not self.listeners and self._loop is not None:
                if self._loop.running:
                    self._loop.stop()
                self._loop = None
                self.latest = None
                self._samples.clear()

        return stop

    def _tick(self) -> None:
        if self._busy:
            return  # the previous snapshot is still being made: skip a beat
        self._busy = True
        d = defer.maybeDeferred(self.service.overview)
        d.addCallback(self._publish)
        d.addErrback(self._failed)

        def idle(_: Any) -> None:
            self._busy = False

        d.addBoth(idle)

    def _failed(self, failure: Any) -> None:
        log.warn("console overview failed: {error}", error=failure.getErrorMessage())
        self._send(event("problem", {"message": f"the overview could not be read: "
                                                f"{failure.getErrorMessage()}"}))

    def _publish(self, overview: Mapping[str, Any]) -> None:
        if not self.listeners:
            return
        self._send(event("overview", self.snapshot(overview)))

    def _send(self, payload: bytes) -> None:
        self.latest = payload
        for listener in list(self.listeners):
            try:
                listener(payload)
            except Exception:
                log.failure("a console stream failed")

    def snapshot(self, overview: Mapping[str, Any]) -> Dict[str, Any]:
        """The overview as the page shows it, with rates and workers' ages."""
        now = self.clock.seconds()
        workers = dict(overview.get("workers") or {})
        backlog = {q.get("name"): _backlog(q) for q in overview.get("queues") or ()}
        self._samples.append((now, {w: d.get("counts") or {} for w, d in workers.items()},
                              backlog))
        while len(self._samples) > 1 and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        rates = self._rates()
        queues = []
        for queue in overview.get("queues") or ():
            name = queue.get("name")
            rate = rates.get(name, {})
            shown = {k: v for k, v in queue.items() if k != "settings"}
            queues.append(dict(shown, rate_in=rate.get("in", 0.0),
                               rate_out=rate.get("out", 0.0),
                               failures_per_minute=rate.get("failures", 0.0) * 60))
        shown = []
        for worker_id, description in sorted(workers.items()):
            item = {k: v for k, v in description.items() if k != "counts"}
            item["id"] = worker_id
            beat_at = description.get("beat_at")
            item["last_beat"] = (now - beat_at) if isinstance(beat_at, (int, float)) else None
            shown.append(item)
        return {"at": now, "queues": queues, "workers": shown,
                "counts": dict(overview.get("counts") or {}), "version": __version__}

    def _rates(self) -> Dict[str, Dict[str, float]]:
        """Per queue: tasks in and out per second, failures per second."""
        if len(self._samples) < 2:
            return {}
        (t0, old, old_backlog), (t1, new, new_backlog) = self._samples[0], self._samples[-1]
        span = t1 - t0
        if span <= 0:
            return {}
        totals: Dict[str, Dict[str, float]] = {}
        for worker, queues in new.items():
            before = old.get(worker)
            if before is None:
                continue  # appeared within the window: its counts start here
            for queue, counts in queues.items():
                was = before.get(queue, {})
                total = totals.setdefault(queue, {"in": 0.0, "out": 0.0, "failures": 0.0})
                total["out"] += _delta(counts, was, _OUT)
                total["failures"] += _delta(counts, was, _FAILURES)
        for queue, now_backlog in new_backlog.items():
            total = totals.setdefault(queue, {"in": 0.0, "out": 0.0, "failures": 0.0})
            then = old_backlog.get(queue)
            grown = (now_backlog - then) if now_backlog is not None and then is not None else 0
            total["in"] = max(0.0, total["out"] + grown)
        return {queue: {k: v / span for k, v in t.items()} for queue, t in totals.items()}


def _backlog(queue: Mapping[str, Any]) -> Optional[int]:
    """Tasks a queue holds: ready, running and delayed (None when one is unknown)."""
    parts = [queue.get(k) for k in ("ready", "unacked", "delayed")]
    if any(not isinstance(p, int) for p in parts):
        return None
    return sum(parts)


def _delta(new: Mapping[str, Any], old: Mapping[str, Any], keys: Tuple[str, ...]) -> float:
    total = 0.0
    for key in keys:
        a, b = new.get(key, 0), old.get(key, 0)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a >= b:
            total += a - b
    return total
