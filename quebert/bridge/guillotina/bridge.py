# -*- test-case-name: tests.test_bridge_guillotina_live -*-
"""
The running bridge: one publisher and one state store per application.

:class:`Bridge` sends a built task the way quebert's ``Client`` does
(claim a unique name first; publish with confirms; record the task
``queued``/``scheduled``), plus what the Guillotina side needs: the
``context`` field in the body and the per-container index.  It cancels
the way ``Client.cancel`` does: the state store's cancel write first, then
the ``cancel`` broadcast on the control exchange.  It waits for results
the way ``Client.result`` does, through one
:class:`~quebert.bridge.guillotina.results.ResultWaiter` (one Redis
subscription) started by the first wait and closed with the bridge.

:func:`start` and :func:`stop` run on Guillotina's application start-up
and clean-up events (see ``subscribers.py``); :func:`get_bridge` is how
the API and the services find it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from quebert import protocol
from quebert.amqp import control
from quebert.amqp.topology import Topology
from quebert.bridge.guillotina.publisher import Publisher
from quebert.bridge.guillotina.settings import BridgeSettings
from quebert.bridge.guillotina.state import BridgeState
from quebert.errors import ConfigurationError, QuebertError
from quebert.protocol import H_ATTEMPTS, H_NOT_BEFORE
from quebert.state.interface import QUEUED, SCHEDULED

if TYPE_CHECKING:
    from quebert.bridge.guillotina.results import ResultWaiter

log = logging.getLogger("quebert.bridge.guillotina")

def job_data(message: protocol.TaskMessage) -> dict:
    """What ``GET @amqp-tasks/{id}`` shows a debugger of the task's message."""
    if message.kind == protocol.URL:
        data: dict = {"kind": message.kind, "method": message.method, "url": message.url,
                      "headers": dict(message.headers),
                      "body": message.body.decode("utf-8", "replace")}
    else:
        data = {"kind": message.kind, "task": message.task, "args": list(message.args),
                "kwargs": dict(message.kwargs)}
    data["context"] = dict(message.context) or None
    return data


class Bridge:
    """
    Publishes tasks and cancels them for one Guillotina application.

    :param settings: the checked ``app_settings["quebert"]``.
    :param publisher: a :class:`Publisher`; built from ``settings`` when ``None``.
    :param state: a :class:`BridgeState`; built from ``settings`` when ``None``.
    """

    def __init__(self, settings: BridgeSettings, *, publisher: Optional[Publisher] = None,
                 state: Optional[BridgeState] = None) -> None:
        self.settings = settings
        self.topology = Topology(exchange=settings.exchange, queue_type=settings.queue_type,
                                 delivery_limit=settings.delivery_limit)
        self.publisher = publisher or Publisher(settings.amqp_url, self.topology,
                                                timeout=settings.publish_timeout)
        self.state = state or BridgeState.from_url(
            settings.redis_url, prefix=settings.state_prefix, finished_ttl=settings.state_ttl,
            retention=settings.state_retention, name_tombstone=settings.name_tombstone)
        self._waiter: Optional[ResultWaiter] = None
        self._closed = False

    async def start(self) -> None:
        """
        Connect to RabbitMQ now, so that a broken configuration shows at
        start-up.  An unreachable broker is logged, not fatal: the first
        publish connects again (and fails, within ``publish_timeout``, if
        it still cannot).
        """
        try:
            await self.publisher.connect()
        except QuebertError as e:
            log.warning("quebert bridge: RabbitMQ is not reachable at start-up (%s); "
                        "publishing will try again", e)

    async def close(self) -> None:
        """
        Close the results subscription (pending waits raise
        ``CancelledError``), the RabbitMQ connection and the Redis client.
        """
        self._closed = True
        waiter = self._waiter
        try:
            if waiter is not None:
                await waiter.close()
        finally:
            try:
                await self.publisher.close()
            finally:
                await self.state.close()

    @property
    def results(self) -> ResultWaiter:
        """The waiter all of this bridge's waits share (made on first use)."""
        if self._closed:
            raise ConfigurationError("the quebert bridge is closed: waiting for results "
                                     "ended with the application")
        if self._waiter is None:
            from quebert.bridge.guillotina.results import ResultWaiter

            self._waiter = ResultWaiter(self.state)
        return self._waiter

    async def result(self, task_id: str, timeout: Optional[float] = None) -> Any:
        """
        The return value of ``task_id`` once it succeeded, as
        ``Client.result``: see :func:`~quebert.bridge.guillotina.api.get_result`.
        """
        return await self.results.result(task_id, timeout)

    async def send(self, message: protocol.TaskMessage, container: Optional[str]) -> None:
        """
        Publish ``message`` (its ``context`` included); index it under
        ``container`` (``{db_id}/{container_id}``) when given.  Returns once
        the broker confirmed it.  A unique name is claimed first
        (:class:`~quebert.errors.TaskAlreadyExists`) and released if the
        publish fails or is cancelled (the task is then recorded ``failed``).
        """
        body = protocol.dumps(message.to_body())
        now = time.time()
        delay = max(0.0, message.eta - now) if message.eta is not None else 0.0
        headers: dict[str, Any] = {H_ATTEMPTS: 0}
        if delay:
            headers[H_NOT_BEFORE] = protocol.to_ms(message.eta)
        state = SCHEDULED if delay else QUEUED
        if container is not None:
            # Before the publish: a task that runs is always findable from
            # its container; an entry whose task never got a record is
            # skipped by listings and pruned later.
            await self.state.index(container, message.id, now, job_data(message),
                                   keep=delay)
        if message.name is not None:
            await self.state.claim(message, state, now)
            try:
                await self.publisher.publish(message.queue, body, headers,
                                             message_id=message.id, delay=delay)
            except BaseException as e:
                # Cancelled too (the request went away while the broker had
                # not confirmed): the name must not stay held by a task
                # that may never exist.
                reason = ("publishing was cancelled" if isinstance(e, asyncio.CancelledError)
                          else f"publishing the task failed: {e}")
                await self._unclaim(message, reason)
                raise
            return
        await self.publisher.publish(message.queue, body, headers, message_id=message.id,
                                     delay=delay)
        try:
            await self.state.enqueued(message, state, time.time())
        except QuebertError as e:
            # The task is safely queued; its record appears when it runs.
            log.warning("task %s is queued but its state record could not be written: %s",
                        message.id, e)

    async def _unclaim(self, message: protocol.TaskMessage, reason: str) -> None:
        """Free the name of a task whose publish failed; shielded from cancellation."""
        try:
            await asyncio.shield(self.state.unclaim(message, time.time(), reason))
        except (QuebertError, asyncio.CancelledError) as e:
            log.warning("task %s was not published and its name %r could not be released: "
                        "%s", message.id, message.name, e or type(e).__name__)

    async def cancel(self, task_id: str, reason: str = "canceled") -> Optional[str]:
        """
        Cancel a task as ``Client.cancel`` does: record it in the state
        store (a queued or scheduled task becomes ``canceled``, a running
        one is marked), then tell every worker through the control
        exchange.  Returns the state the task was in (``None``: unknown).
        """
        old = await self.state.cancel(task_id, time.time(), reason)
        if old is None or old in ("succeeded", "failed", "canceled"):
            return old
        try:
            await self.publisher.publish_control(control.CANCEL, id=task_id)
        except QuebertError as e:
            # Recorded: workers will not start it; a running attempt ends
            # canceled when it is recorded.
            log.warning("cancel of task %s recorded but not broadcast: %s", task_id, e)
        return old


_bridge: Optional[Bridge] = None


def get_bridge() -> Bridge:
    """The application's bridge; ``ConfigurationError`` when it is not running."""
    if _bridge is None:
        raise ConfigurationError(
            "the quebert bridge is not running: add \"quebert.bridge.guillotina\" to the "
            "application's \"applications\" and publish from within the application")
    return _bridge


def set_bridge(bridge: Optional[Bridge]) -> None:
    """Make ``bridge`` the one :func:`get_bridge` returns (``None``: none)."""
    global _bridge
    _bridge = bridge


async def start(settings: Any) -> Bridge:
    """Build the bridge from ``app_settings["quebert"]``, connect it, make it current."""
    bridge = Bridge(BridgeSettings.from_mapping(settings))
    await bridge.start()
    set_bridge(bridge)
    return bridge


async def stop() -> None:
    """Close the current bridge, if any."""
    bridge = _bridge
    set_bridge(None)
    if bridge is not None:
        await bridge.close()
