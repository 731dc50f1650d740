"""
The 3-node RabbitMQ test cluster (``tests._cluster``,
``scripts/rabbitmq-cluster.sh``) does what the failover tests built on it
rely on: three clustered nodes, quorum queues replicated on all of them,
a new leader elected after ``kill -9`` of the old one without losing a
message, and the killed node back in the cluster after ``restart``.

The cluster is started once per test process (about 20 s on 2 cores) and
stopped when the process exits; the main node on 5672 is not involved.
Blocking pika calls run in a thread.
"""

from __future__ import annotations

import time
from typing import List

import pika
from twisted.internet.threads import deferToThread

from tests._cluster import NODES, ClusterTestCase
from tests._worker import sleep, wait_for

QUEUE = "work"
#: Seconds a surviving node may take to elect a new quorum queue leader.
ELECTION_BOUND = 30.0
#: Seconds a restarted node may take to be back and its replica online.
REJOIN_BOUND = 60.0


def declare_and_publish(url: str, queue: str, bodies: List[bytes]) -> None:
    """Declare quorum queue ``queue`` and publish ``bodies`` to it with confirms."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2),
                                  mandatory=True)
    finally:
        connection.close()


def get_all(url: str, queue: str) -> List[bytes]:
    """Read and ack every message of ``queue`` through ``url``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        bodies = []
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        connection.close()


class ClusterTests(ClusterTestCase):
    timeout = 240

    async def test_three_nodes_clustered(self):
        """Each node sees all three running."""
        for node in NODES:
            self.assertEqual(await self.cluster.running_nodes(node), list(NODES))
        self.assertEqual(len(self.cluster.urls), 3)
        self.assertNotIn(":5672/", ",".join(self.cluster.urls))

    async def test_quorum_queue_replicated(self):
        """A quorum queue declared on c1 has members on c1-c3; c3 reads what c1 got."""
        vhost = self.cluster.make_vhost(self)
        await deferToThread(declare_and_publish, self.cluster.url("c1", vhost), QUEUE,
                            [b"one", b"two"])
        self.assertEqual(await self.cluster.members(QUEUE, vhost), list(NODES))
        self.assertIn(await self.cluster.leader(QUEUE, vhost), NODES)
        bodies = await deferToThread(get_all, self.cluster.url("c3", vhost), QUEUE)
        self.assertEqual(bodies, [b"one", b"two"])

    async def test_leader_killed(self):
        """
        ``kill -9`` of the leader: another node leads within
        ``ELECTION_BOUND`` with every message; the killed node comes back.
        """
        vhost = self.cluster.make_vhost(self)
        sent = [f"m{i}".encode() for i in range(50)]
        await deferToThread(declare_and_publish, self.cluster.url("c1", vhost), QUEUE, sent)
        leader = await self.cluster.leader(QUEUE, vhost)
        self.assertIn(leader, NODES)

        killed_at = time.monotonic()
        await self.cluster.kill(leader, self)
        self.assertNotIn(leader, await self.cluster.running_nodes())
        new_leader, _ = await self.cluster.wait_leader(QUEUE, vhost, timeout=ELECTION_BOUND,
                                                       not_on=(leader,))
        elected_after = time.monotonic() - killed_at
        self.assertNotEqual(new_leader, leader)
        self.assertLess(elected_after, ELECTION_BOUND)

        survivor = next(n for n in NODES if n != leader)
        bodies = await deferToThread(get_all, self.cluster.url(survivor, vhost), QUEUE)
        self.assertEqual(bodies, sent)

        restarted_at = time.monotonic()
        await self.cluster.restart(leader)
        self.assertEqual(await self.cluster.running_nodes(survivor), list(NODES))

        async def replica_online() -> bool:
            info = await self.cluster.rabbitmqctl(survivor, "list_queues", "-p", vhost,
                                                  "--no-table-headers", "name", "online")
            return any(line.startswith(QUEUE + "\t") and f"quebert-{leader}@" in line
                       for line in info.splitlines())

        await wait_for(replica_online, REJOIN_BOUND, interval=0.5,
                       what=f"{leader}'s replica of {QUEUE} to be online")
        self.assertLess(time.monotonic() - restarted_at, REJOIN_BOUND)
        # The restarted node serves AMQP again.
        await deferToThread(declare_and_publish, self.cluster.url(leader, vhost), QUEUE,
                            [b"after"])
        await sleep(0)
        bodies = await deferToThread(get_all, self.cluster.url(leader, vhost), QUEUE)
        self.assertEqual(bodies, [b"after"])
