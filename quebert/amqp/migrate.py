# -*- test-case-name: tests.test_migrate -*-
"""
Changing the type of queues that already exist, in place, without losing
a message.

RabbitMQ cannot change a queue's arguments, and a classic and a quorum
queue cannot share a name: moving work queue ``Q`` to another type means
emptying it into a temporary queue, deleting it, declaring it anew and
moving the messages back.  :class:`QueueMigration` does that while
producers keep publishing:

1. the temporary queue ``Q.migrating`` (of the new type) is bound where
   ``Q`` is, and ``Q``'s bindings are removed: new tasks land in it;
2. ``Q``'s messages are moved to it, each published with publisher
   confirms before it is acked;
3. ``Q`` is deleted (only if empty and unused) and declared with the new
   arguments and its bindings;
4. ``Q.migrating`` is unbound and its messages moved back; it is deleted.

A task published between the binding of the new ``Q`` and the unbinding
of ``Q.migrating`` reaches both and runs once: the second copy is settled
from the state store like any duplicate (``docs/protocol.rst``).  The
errored queue ``Q.errored`` goes the same way (it has no bindings).

The workers consuming ``Q`` must be stopped first (a queue with consumers
is refused: their unacked messages would be lost with the queue).  An
interrupted migration is finished by running it again.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator, Callable, Optional

import attrs
import pika
import pika.exceptions
from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from quebert import protocol as wire
from quebert._defer import mirror
from quebert.amqp.admin import BrokerAdmin
from quebert.amqp.topology import LEVELS, Topology
from quebert.errors import BrokerError

log = Logger(namespace="quebert.amqp.migrate")

#: Messages taken (unacked) and published before they are acked at once.
BATCH = 200
#: Suffix of the temporary queue.
TEMPORARY = ".migrating"
#: Seconds between the unbinding of the temporary queue and its last check.
SETTLE = 1.0


@attrs.frozen
class MigrationReport:
    """What one queue's migration did."""

    queue: str
    #: ``migrated``, ``already`` (it had the arguments already) or ``absent``.
    outcome: str
    #: Messages moved out of the old queue (and back into the new one).
    moved: int = 0


class MigrationRefused(BrokerError):
    """The queue cannot be migrated now (it has consumers, say)."""


class QueueMigration(BrokerAdmin):
    """
    Migrates queues to ``topology``'s type and arguments over a prepared
    AMQP connection (``connection.whenReady()``), publishing with
    ``publish(exchange, routing_key, body, properties)`` (confirmed: a
    :class:`~quebert.amqp.publisher.Publisher`'s ``publish``).
    """

    def __init__(self, connection: Any, topology: Topology,
                 publish: Callable[..., defer.Deferred],
                 progress: Optional[Callable[[str], Any]] = None) -> None:
        super().__init__(connection, topology)
        self.publish = publish
        self.progress = progress or (lambda line: None)

    @contextlib.asynccontextmanager
    async def _opened(self) -> AsyncIterator[Any]:
        """A channel of its own, closed afterwards (a refusal closes it anyway)."""
        channel = await self._channel()
        try:
            yield channel
        finally:
            if channel.is_open:
                channel.close()

    async def _has_arguments(self, name: str, arguments: dict) -> bool:
        """Whether queue ``name`` exists with exactly ``arguments`` (declares it otherwise)."""
        async with self._opened() as channel:
            try:
                await mirror(channel.queue_declare(queue=name, durable=True,
                                                   arguments=arguments))
                return True
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 406:
                    return False
                raise

    async def _declare_fresh(self, name: str, arguments: dict) -> None:
        async with self._opened() as channel:
            await mirror(channel.queue_declare(queue=name, durable=True, arguments=arguments))

    async def _route(self, channel: Any, name: str, queue: str, bind: bool) -> None:
        """Bind (or unbind) queue ``name`` where work queue ``queue`` is bound."""
        for exchange, key in [(self.topology.exchange, queue),
                              (self.topology.deliver_exchange, "*." * LEVELS + queue)]:
            if bind:
                await mirror(channel.queue_bind(queue=name, exchange=exchange,
                                                routing_key=key))
            else:
                await mirror(channel.queue_unbind(queue=name, exchange=exchange,
                                                  routing_key=key))

    async def _bind(self, name: str, queue: str, bind: bool) -> None:
        async with self._opened() as channel:
            await self._route(channel, name, queue, bind)

    async def _swap(self, temporary: str, queue: str) -> None:
        """Bind ``queue`` where it belongs and unbind ``temporary``, back to back."""
        async with self._opened() as channel:
            await self._route(channel, queue, queue, bind=True)
            await self._route(channel, temporary, queue, bind=False)

    async def _move(self, source: str, destination: str) -> int:
        """
        Move every message of ``source`` to ``destination`` (through the
        default exchange): a batch is taken unacked, published with
        confirms, then acked, so a failure at any point leaves every
        message in one of the two queues (or, at worst, in both).
        """
        moved = 0
        async with self._opened() as channel:
            while True:
                batch = []
                for _ in range(BATCH):
                    got = await mirror(channel.basic_get(source, auto_ack=False))
                    if got is None:
                        break
                    batch.append(got)
                if not batch:
                    return moved
                copies = [defer.ensureDeferred(self._copy(destination, got)) for got in batch]
                try:
                    await defer.gatherResults(copies, consumeErrors=True)
                except defer.FirstError as e:
                    raise e.subFailure.value from None
                channel.basic_ack(batch[-1].method.delivery_tag, multiple=True)
                moved += len(batch)
                self.progress(f"{source}: {moved} message(s) moved to {destination}")

    def _copy(self, destination: str, got: Any) -> defer.Deferred:
        p = got.properties
        properties = pika.BasicProperties(
            content_type=p.content_type, content_encoding=p.content_encoding,
            headers=wire.republish_headers(p.headers), delivery_mode=2,
            priority=p.priority, correlation_id=p.correlation_id, reply_to=p.reply_to,
            expiration=p.expiration, message_id=p.message_id, timestamp=p.timestamp,
            type=p.type, user_id=p.user_id, app_id=p.app_id)
        return self.publish("", destination, got.body, properties)

    async def _delete(self, name: str, quorum: bool) -> None:
        """
        Delete queue ``name`` if it is empty and has no consumer.  A classic
        queue is deleted with ``if-empty`` and ``if-unused``; RabbitMQ does
        not implement those for quorum queues (it closes the connection), so
        a quorum one is checked first, then deleted: it is unbound by then,
        so nothing new can reach it.
        """
        flags = {"if_unused": True, "if_empty": True}
        if quorum:
            found = await self.depth(name)
            if found is None:
                return
            if found != (0, 0):
                raise MigrationRefused(
                    f"queue {name!r} is not empty or has consumers ({found[0]} ready, "
                    f"{found[1]} consumer(s)): run the migration again")
            flags = {}
        async with self._opened() as channel:
            try:
                await mirror(channel.queue_delete(queue=name, **flags))
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code != 404:
                    raise MigrationRefused(
                        f"RabbitMQ refused to delete queue {name!r} ({e.reply_code} "
                        f"{e.reply_text}): a consumer or a message arrived meanwhile; run "
                        "the migration again") from e

    async def migrate(self, queue: str) -> list[MigrationReport]:
        """Migrate work queue ``queue`` and its errored queue; one report each."""
        work = await self._migrate(queue, self.topology.work_queue_arguments(queue),
                                   bound=True)
        errored = await self._migrate(self.topology.errored_queue(queue),
                                      self.topology.errored_queue_arguments(), bound=False)
        return [work, errored]

    async def _migrate(self, name: str, arguments: dict, bound: bool) -> MigrationReport:
        temporary = name + TEMPORARY
        current = await self.depth(name)
        resuming = await self.depth(temporary) is not None
        if current is None and not resuming:
            self.progress(f"{name}: no such queue, nothing to migrate")
            return MigrationReport(name, "absent")
        if current is not None and current[1]:
            raise MigrationRefused(
                f"queue {name!r} has {current[1]} consumer(s): stop the workers that consume "
                "it, then migrate it (their unacked tasks would be lost with the queue)")
        if not resuming and await self._has_arguments(name, arguments):
            self.progress(f"{name}: already a {self.topology.queue_type} queue with "
                          "quebert's arguments")
            return MigrationReport(name, "already")
        moved = 0
        quorum = self.topology.queue_type == "quorum"
        # 1. new tasks go to the temporary queue
        await self._declare_fresh(temporary, arguments)
        if bound:
            await self._bind(temporary, name, bind=True)
        if current is not None:
            if bound:
                await self._bind(name, name, bind=False)
            # 2. the old queue is emptied into it, then 3. replaced
            moved = await self._move(name, temporary)
            await self._delete(name, quorum=not quorum)
            self.progress(f"{name}: old queue deleted after moving {moved} message(s)")
        await self._declare_fresh(name, arguments)
        if bound:
            # 4. the temporary queue is unbound (right after: the copies of
            # tasks published in between reach both queues), emptied back
            # and deleted
            await self._swap(temporary, name)
        back = await self._move(temporary, name)
        # a message routed just before the unbinding may still be on its way in
        await deferLater(self.connection.reactor, SETTLE, lambda: None)
        back += await self._move(temporary, name)
        await self._delete(temporary, quorum=quorum)
        self.progress(f"{name}: now a {self.topology.queue_type} queue; {back} message(s) "
                      "moved into it")
        log.info("queue {queue} migrated to {kind} ({moved} message(s) moved)", queue=name,
                 kind=self.topology.queue_type, moved=moved)
        return MigrationReport(name, "migrated", moved)

    async def drop_other_delays(self) -> dict[str, int]:
        """
        Delete the other queue type's delay queues and exchanges (left by a
        deployment that switched type) once every one of those queues is
        empty; ``{queue: ready}`` of those that still hold messages, in
        which case nothing is deleted (run it again once they drained).

        Queues go from the longest level down: a level is deleted only when
        no level above it is left to dead-letter a message into it.
        """
        other = attrs.evolve(self.topology, queue_type="quorum"
                             if self.topology.queue_type == "classic" else "classic")
        waiting, present = {}, []
        for name in other.delay_queues():
            found = await self.depth(name)
            if found is None:
                continue
            present.append(name)
            if found[0]:
                waiting[name] = found[0]
        if waiting:
            return waiting
        for name in reversed(present):
            await self._delete(name, quorum=other.queue_type == "quorum")
            self.progress(f"{name}: deleted")
        async with self._opened() as channel:
            for level in reversed(range(LEVELS)):
                await mirror(channel.exchange_delete(exchange=other.delay_exchange(level)))
        self.progress(f"the {other.queue_type} delay levels are deleted")
        return {}
