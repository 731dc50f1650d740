# -*- test-case-name: tests.test_bridge_guillotina_live -*-
"""
Publishing quebert messages from asyncio, with aio-pika.

The same rules as quebert's Twisted publisher (``quebert/amqp/publisher.py``)
and ``docs/protocol.rst`` "Where to publish", in asyncio:

* one robust (reconnecting) connection and one channel with publisher
  confirms and ``on_return_raises=True``: a message no queue receives comes
  back as an error instead of vanishing (the aio-pika default, ``False``,
  silently accepts unroutable messages), and a publish returns only once
  the broker has the message;
* every task is published ``mandatory``, persistent, as JSON, with the task
  id as ``message_id``;
* on every connection the main ``direct`` exchange, the ``fanout`` control
  exchange and the delay topology are declared exactly as the workers and
  quebert's own ``Client`` declare them (names and arguments come from
  :class:`~quebert.amqp.topology.Topology`), and each work queue is
  declared and bound before the first publish to it, so a task sent before
  any worker ever ran is kept, and a countdown works;
* declarations run on a channel of their own, because RabbitMQ closes the
  channel of a declaration it refuses (``406 PRECONDITION_FAILED``); a
  queue that exists with other arguments (an earlier release's classic
  queue, say) is then used as it is, as the workers do.

Errors are translated at this boundary into quebert's own
(:class:`~quebert.errors.BrokerError` and subclasses).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional
from urllib.parse import urlsplit

from quebert.amqp import control
from quebert.amqp.connection import split_amqp_urls
from quebert.amqp.topology import LEVELS, MAX_DELAY_MS, Topology
from quebert.errors import BrokerError, PublishError, UnroutableError

logger = logging.getLogger(__name__)

#: Seconds between two attempts of a publish that met a closed connection.
RETRY_INTERVAL = 0.5
#: Seconds between two reconnection attempts of the robust connection (at
#: most a third of the publish timeout).  aio-pika's default, 5 s, is also
#: how long it waits after a successful connection before it may reconnect:
#: longer than a short ``publish_timeout``, so a publish right after RabbitMQ
#: closed the connection failed although the broker was up.  An
#: ``amqp_url`` with ``?reconnect_interval=`` keeps its own.
RECONNECT_INTERVAL = 1.0


class Publisher:
    """
    Publishes task and control messages to RabbitMQ from an asyncio loop.

    :param amqp_url: the broker (``amqp://user:password@host:port/vhost``), or
        the URLs of a cluster's nodes (separated by commas, or a list): it
        connects to the first that answers and, when a publish meets a lost
        connection, moves to the next node instead of waiting for that one.
    :param topology: exchange name and queue type shared with the workers.
    :param timeout: seconds one publish may take, reconnection included.
    """

    def __init__(self, amqp_url: Any, topology: Topology, *, timeout: float = 10.0) -> None:
        self.urls = split_amqp_urls(amqp_url)
        self.amqp_url = self.urls[0]
        #: ``host:port/vhost`` of the node connected to, ``None`` while not connected.
        self.node: Optional[str] = None
        self._next = 0
        self.topology = topology
        self.timeout = timeout
        self.reconnect_interval = min(RECONNECT_INTERVAL, timeout / 3)
        self._connection: Any = None
        self._channel: Any = None
        self._declared: set[str] = set()
        self._topology_declared = False
        self._lock = asyncio.Lock()

    # -- connection ------------------------------------------------------

    async def connect(self) -> None:
        """
        Connect (once; later calls return at once) and declare the topology;
        :class:`BrokerError` when RabbitMQ cannot be reached.
        """
        try:
            await asyncio.wait_for(self._open(), self.timeout)
        except BrokerError:
            raise
        except Exception as e:
            raise BrokerError(f"cannot connect to RabbitMQ: {type(e).__name__}: {e}") from e

    async def _open(self) -> None:
        async with self._lock:
            if self._connection is not None:
                if not self._connection.is_closed:
                    return
                # several nodes: a lost connection is not reconnected to its node
                self._forget()
            import aio_pika

            connection = None
            for i in range(len(self.urls)):
                index = (self._next + i) % len(self.urls)
                url = self.urls[index]
                try:
                    if len(self.urls) == 1:
                        # one node: aio-pika reconnects to it by itself
                        options: dict = {}
                        if "reconnect_interval" not in urlsplit(url).query:
                            options["reconnect_interval"] = self.reconnect_interval
                        connection = await aio_pika.connect_robust(url, timeout=self.timeout,
                                                                   **options)
                    else:
                        # several: each loss moves to the next node (see _publish)
                        connection = await aio_pika.connect(url, timeout=self.timeout)
                except Exception:
                    if i == len(self.urls) - 1:
                        raise
                    logger.info("RabbitMQ node %s did not answer; trying the next one",
                                _address(url))
                    continue
                self._next = (index + 1) % len(self.urls)
                self.amqp_url = url
                break
            try:
                self._channel = await connection.channel(publisher_confirms=True,
                                                         on_return_raises=True)
                await self._declare_topology(connection)
            except BaseException:
                await connection.close()
                raise
            if len(self.urls) == 1:
                connection.reconnect_callbacks.add(self._reconnected)
            self._connection = connection
            self.node = _address(self.amqp_url)
            logger.info("quebert bridge connected to RabbitMQ at %s", self.node)

    def _forget(self) -> None:
        """Forget the connection and what was declared on it."""
        self._connection = self._channel = None
        self.node = None
        self._reconnected()

    async def _drop(self) -> None:
        """Close the connection, so that the next publish connects to the next node."""
        connection = self._connection
        self._forget()
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), 1.0)
            except Exception:
                pass  # the node is gone: nothing to close politely

    def _reconnected(self, *_: Any) -> None:
        # A new connection may reach a broker that lost non-durable state
        # or was reset: declare again before the next publish.
        self._declared.clear()
        self._topology_declared = False

    async def close(self) -> None:
        """Close the connection (pending publishes fail)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            await connection.close()

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    # -- declarations ----------------------------------------------------

    async def _declare_topology(self, connection: Any) -> None:
        """Exchanges and delay levels, as ``Topology.declare_delays`` declares them."""
        import aio_pika

        topology = self.topology
        direct, fanout, topic = (aio_pika.ExchangeType.DIRECT, aio_pika.ExchangeType.FANOUT,
                                 aio_pika.ExchangeType.TOPIC)
        async with connection.channel(publisher_confirms=False) as channel:
            await channel.declare_exchange(topology.control_exchange, fanout, durable=True)
            await channel.declare_exchange(topology.exchange, direct, durable=True)
            await channel.declare_exchange(topology.deliver_exchange, topic, durable=True)
            exchanges = [await channel.declare_exchange(topology.delay_exchange(level), topic,
                                                        durable=True)
                         for level in range(LEVELS)]
            for level in range(LEVELS):
                prefix = "*." * (LEVELS - 1 - level)
                queue = await self._declare(channel, topology.delay_queue(level),
                                            topology.delay_queue_arguments(level))
                await queue.bind(exchanges[level], routing_key=prefix + "1.#")
                lower = exchanges[level - 1] if level else topology.deliver_exchange
                await _bind_exchange(channel, lower, exchanges[level], prefix + "0.#")
        self._topology_declared = True

    async def _ensure_queue(self, queue: str) -> None:
        """Declare work queue ``queue`` and its bindings, as ``Topology.declare_queue`` does."""
        if queue in self._declared and self._topology_declared:
            return
        connection = self._connection
        if not self._topology_declared:
            await self._declare_topology(connection)
        async with connection.channel(publisher_confirms=False) as channel:
            declared = await self._declare(channel, queue,
                                           self.topology.work_queue_arguments(queue))
            await declared.bind(self.topology.exchange, routing_key=queue)
            await declared.bind(self.topology.deliver_exchange,
                                routing_key="*." * LEVELS + queue)
        self._declared.add(queue)

    async def _declare(self, channel: Any, name: str, arguments: dict) -> Any:
        """
        Declare durable queue ``name`` on ``channel``; when it exists with
        other arguments (the broker closes ``channel``), reopen ``channel``,
        check that the queue exists and use it as it is.
        """
        try:
            return await channel.declare_queue(name, durable=True, arguments=arguments)
        except Exception as e:
            if type(e).__name__ != "ChannelPreconditionFailed":
                raise
            if name not in self.topology.mismatched:
                self.topology.mismatched[name] = str(e)
                logger.warning("queue %s exists with other arguments than quebert declares "
                               "(%s); using it as it is", name, e)
        await channel.reopen()
        return await channel.declare_queue(name, passive=True)

    # -- publishing ------------------------------------------------------

    async def publish(self, queue: str, body: bytes, headers: dict, *, message_id: str,
                      delay: float = 0.0) -> None:
        """
        Publish a task to ``queue`` (through the delay queues when ``delay``
        seconds > 0) and wait for the broker's confirm.  Raises
        :class:`UnroutableError` when no queue received it,
        :class:`PublishError` when the broker refused it, and
        :class:`BrokerError` when RabbitMQ cannot be reached in time.
        """
        import aio_pika

        message = aio_pika.Message(body, content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   message_id=message_id, headers=headers)
        delay_ms = int(round(max(delay, 0.0) * 1000))
        if delay_ms > 0:
            exchange, routing_key = self.topology.delay_route(min(delay_ms, MAX_DELAY_MS), queue)
        else:
            exchange, routing_key = self.topology.exchange, queue
        await self._publish(exchange, routing_key, message, declare=queue, mandatory=True)

    async def publish_control(self, command: str, **fields: Any) -> None:
        """
        Broadcast a control command (``docs/protocol.rst``, "The control
        exchange"): not persistent, not mandatory (dropped when no worker
        listens), confirmed.
        """
        import aio_pika

        message = aio_pika.Message(control.encode(command, **fields),
                                   content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        await self._publish(self.topology.control_exchange, "", message, declare=None,
                            mandatory=False)

    async def _publish(self, exchange_name: str, routing_key: str, message: Any, *,
                       declare: Optional[str], mandatory: bool) -> None:
        from aio_pika.exceptions import (
            AMQPConnectionError,
            ChannelClosed,
            ChannelInvalidStateError,
            DeliveryError,
        )
        from aio_pika.exceptions import PublishError as Returned

        deadline = time.monotonic() + self.timeout
        redeclared = False
        while True:
            left = deadline - time.monotonic()
            try:
                await asyncio.wait_for(self._open(), max(left, 0.001))
                if declare is not None:
                    await asyncio.wait_for(self._ensure_queue(declare), max(left, 0.001))
                exchange = await self._channel.get_exchange(exchange_name, ensure=False)
                await exchange.publish(message, routing_key, mandatory=mandatory,
                                       timeout=max(deadline - time.monotonic(), 0.001))
                return
            except Returned as e:
                if declare is not None and not redeclared:
                    # The queue was deleted since it was declared (no queue got
                    # the message, so sending it again duplicates nothing).
                    self._declared.discard(declare)
                    redeclared = True
                    continue
                raise UnroutableError(
                    f"no queue is bound to exchange {exchange_name!r} with routing key "
                    f"{routing_key!r}") from e
            except DeliveryError as e:
                raise PublishError(f"RabbitMQ refused the message (nack): {e}") from e
            except BrokerError:
                raise
            except (asyncio.TimeoutError, AMQPConnectionError, ChannelClosed,
                    ChannelInvalidStateError, ConnectionError) as e:
                if time.monotonic() + RETRY_INTERVAL >= deadline:
                    raise BrokerError(
                        f"publish to {exchange_name}/{routing_key} failed within "
                        f"{self.timeout:g}s: {type(e).__name__}: {e}") from e
                if len(self.urls) > 1 and not isinstance(e, ChannelClosed):
                    # the node may be gone for good: the next attempt goes to the next
                    logger.warning("publish through RabbitMQ node %s failed (%s: %s); "
                                   "moving to the next node", self.node, type(e).__name__, e)
                    await self._drop()
                    continue
                await asyncio.sleep(RETRY_INTERVAL)


def _address(url: str) -> str:
    """``host:port/vhost`` of ``url``, without its credentials."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5672}{parts.path or '/'}"


async def _bind_exchange(channel: Any, destination: Any, source: Any, routing_key: str) -> None:
    """Bind exchange ``source`` to ``destination`` (an exchange or its name)."""
    if isinstance(destination, str):
        destination = await channel.get_exchange(destination, ensure=False)
    await destination.bind(source, routing_key=routing_key)
