"""
Scenario: a RabbitMQ cluster node lost (``kill -9``) mid-batch: the node
that leads the work queue and the delay queues; restarted later in the run.

On the 3-node test cluster (``tests/_cluster.py``), default configuration
(quorum queues, no ``--queue-type``).  The client, given the three node
URLs, connects to c1 and declares the queues there, so RabbitMQ puts
their leaders on c1 (its ``client-local`` leader locator): the work queue
and every delay level, with retries waiting in them when the node goes
(one task in ten fails its first run).  Two workers are given the three
URLs in different orders, starting at the leader's node and at the next
one, so that one of them loses its node and the other does not.

The kill must cost no task: the quorum queues elect new leaders on the
two other nodes with every confirmed message; the worker that lost its
node must connect to another one by itself (``--amqp-url`` takes the list)
and go on; the one on a surviving node must go on too; publishes the
client makes through the kill (a wave published at a steady pace) are
retried on its new connection.  Then the killed node is started again
while the batch runs, and must rejoin: back among the running nodes, an
online replica of every quorum queue, its replica of the work queue
caught up with the leader.  Then the suite's accounting.

RabbitMQ 3.10 holds the retries it was moving from one delay level to the
next (at-least-once dead-lettering) when the next level's leader dies,
until the node is back and sometimes minutes longer (docs/reliability.rst,
"Retries held by RabbitMQ after a node loss"): the scenario counts them
and requires none left ``RELEASE_BOUND`` seconds after the node's return,
with the nodes' ``dead_letter_worker_publisher_confirm_timeout`` at 5 s
(``FaultCase.cluster_settings``).
"""

from __future__ import annotations

import time

from twisted.internet import defer

from tests._cluster import NODES
from tests._worker import sleep
from tests.faults._harness import FaultCase, until

TASKS = 2000
#: Tasks published at a steady pace through the kill (on top of TASKS).
WAVE = 200
WAVE_PER_SECOND = 50.0
PREFETCH = 20
#: Each task's sleep: 2 workers run at most 2 * PREFETCH / SECONDS tasks a
#: second, so that the batch outlasts the kill, the election and the restart.
SECONDS = 1.0
#: Seconds the node stays down at least before the test starts it again.
DOWN = 5.0
#: Seconds from the kill to the first task the moved worker starts on its
#: new node, at most (0.8-2.2 s measured in 11 runs on 2 cores).
RECOVERY_BOUND = 15.0
#: Seconds the surviving nodes may take to elect new leaders for every
#: quorum queue of the vhost (under 1 s measured, rabbitmqctl's own time
#: included).
ELECTION_BOUND = 30.0
#: Seconds the restarted node may take to have every replica online and
#: its replica of the work queue caught up (1-3 s measured, after a
#: restart of 8-13 s).
REJOIN_BOUND = 90.0
#: Seconds from the node's return until RabbitMQ no longer holds any message
#: for dead-lettering (retries it was moving between delay levels): 3-6 s
#: measured, which is list_queues' own lag.
RELEASE_BOUND = 60.0
#: A task counts as started after the kill (so delivered on a new
#: connection) when its run began this long after the node was gone.
STARTED_AFTER = 0.25


def rotation(first: str) -> tuple:
    """The cluster's nodes in order, starting at ``first``."""
    i = NODES.index(first)
    return NODES[i:] + NODES[:i]


class NodeLossTests(FaultCase):
    scenario = "node-loss"
    fault = ("kill -9 of the cluster node leading the quorum queues mid-batch, two workers "
             "on different nodes, node restarted later (3-node cluster, quorum queues)")
    on_cluster = True
    timeout = 420

    def test_leader_node_killed_mid_batch(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        def options(i: int) -> dict:
            return {"seconds": SECONDS, "fail_first": i % 10 == 0}

        ids = await self.publish(TASKS, options=options)
        queues = await self.quorum_queues()
        victim = queues["default"]["leader"]
        self.assertIsNotNone(victim, f"the work queue has no leader: {queues}")
        delays = sorted(q for q in queues if q.startswith("quebert.qdelay."))
        self.assertEqual(len(delays), 32, sorted(queues))
        # The client declared them all from one node: they are led from there.
        self.assertEqual(sorted(q for q in delays if queues[q]["leader"] != victim), [],
                         f"delay queues led from another node than the work queue ({victim})")
        for info in queues.values():
            self.assertEqual(info["members"], list(NODES))

        order_a, order_b = rotation(victim), rotation(victim)[1:] + rotation(victim)[:1]
        a = self.worker("a", queues=(f"default:{PREFETCH}",),
                        amqp_url=self.node_urls(*order_a)).start()
        b = self.worker("b", queues=(f"default:{PREFETCH}",),
                        amqp_url=self.node_urls(*order_b)).start()
        for w in (a, b):
            await w.ready()
        await until(lambda: all(self.worker_nodes(w, c) for w in (a, b)
                                for c in ("consumer", "publisher")), 30,
                    "both workers' connections")
        for w, node in ((a, order_a[0]), (b, order_b[0])):
            for connection in ("consumer", "publisher"):
                self.assertEqual(self.worker_nodes(w, connection), [node],
                                 f"worker {w.log_path}: {connection} connection")
        a_pid, b_pid = a.process.pid, b.process.pid
        await until(lambda: len(self.runs) >= TASKS // 4 and self.runs.pids()[a_pid] >= 50,
                    90, "a quarter of the batch")

        # A wave of publishes under way through the kill; the client is on the victim.
        publishing = self.client.broker.publishing
        self.assertEqual(publishing.url, self.cluster.url(victim, self.vhost))
        wave = defer.ensureDeferred(self.publish(WAVE, start=TASKS, options=options,
                                                 per_second=WAVE_PER_SECOND))
        await sleep(1.0)

        kill_began = time.time()
        await self.cluster.kill(victim, self)
        killed_at = time.time()
        ran_at_kill = len(self.runs)
        self.assertLess(ran_at_kill, TASKS, "the kill must happen mid-batch")

        await self.wait_leaders(not_on=victim, timeout=ELECTION_BOUND)
        election_s = time.time() - killed_at

        def moved() -> bool:
            return all(len(self.worker_nodes(a, c)) >= 2 for c in ("consumer", "publisher"))

        await until(moved, RECOVERY_BOUND + 30, "worker a's connections to move")
        moved_s = time.time() - killed_at
        for connection in ("consumer", "publisher"):
            self.assertNotIn(victim, self.worker_nodes(a, connection)[1:],
                             f"worker a's {connection} connection went back to the lost node")

        def started_after_kill(pid: int) -> list:
            return sorted(r.at for r in self.runs.read()
                          if r.pid == pid and r.at - SECONDS > killed_at + STARTED_AFTER)

        await until(lambda: started_after_kill(a_pid), RECOVERY_BOUND + 30,
                    "worker a to run a task on its new node")
        recovery_s = started_after_kill(a_pid)[0] - killed_at

        ids.update(await wave)
        self.assertNotEqual(publishing.url, self.cluster.url(victim, self.vhost),
                            "the client's connection did not leave the lost node")
        late = [confirmed - sent for sent, confirmed in
                (self.published[i] for i in range(TASKS, TASKS + WAVE))
                if confirmed > kill_began]

        # The node stays away a while, then comes back while the batch runs.
        await sleep(max(0.0, killed_at + DOWN - time.time()))
        held_down = await self.held()
        restart_s = await self.restart_node(victim)
        back_at = time.time()
        for node in NODES:
            self.assertEqual(await self.cluster.running_nodes(node), list(NODES),
                             f"{victim} is not back in the cluster as {node} sees it")
        sync_s = await self.wait_in_sync(victim, timeout=REJOIN_BOUND)
        ran_at_rejoin = len(self.runs)
        for w in (a, b):
            self.assertTrue(w.alive, "a worker exited:\n" + w.log()[-3000:])

        # RabbitMQ keeps the retries it was moving to a queue whose leader
        # died (at-least-once dead-lettering) until they are confirmed.
        async def released() -> bool:
            return not await self.held()

        await until(released, RELEASE_BOUND, "the retries held by RabbitMQ to move on",
                    interval=1.0)
        released_s = time.time() - back_at

        records = await self.wait_done(ids, workers=(a, b), timeout=240)
        expected = {i: 2 if i % 10 == 0 else 1 for i in ids}
        tally = self.tally(records, expected)
        # In flight at the kill: the prefetch of each consuming connection
        # lost (worker a's; b's connection is on a node that stayed).  Their
        # outcomes may be recorded while their acks died with the node.
        lost = {w: len(self.worker_nodes(w)) - 1 for w in (a, b)}
        self.check(tally, duplicate_bound=PREFETCH * sum(lost.values()), records=records)
        await self.assert_queues()
        self.recovered(recovery_s, RECOVERY_BOUND,
                       "kill -9 to the first task the moved worker started on its new node")
        self.assertEqual(lost[b], 0, "worker b lost its connection although its node stayed")
        b_during = sum(1 for r in self.runs.read()
                       if r.pid == b_pid and killed_at < r.at <= killed_at + recovery_s)
        gap = self.runs.largest_gap(killed_at, killed_at + recovery_s + 5.0)
        retries = sum(w.log().count("; retry #") for w in (a, b))
        left_at_rejoin = max(0, sum(expected.values()) - ran_at_rejoin)
        await self.stop_workers(a, b)
        await self.assert_queues()
        self.passed(
            f"killed {victim} (leading {len(queues)} quorum queues) after {ran_at_kill} runs; "
            f"new leaders {election_s:.1f}s, worker a on {self.worker_nodes(a)[-1]} "
            f"after {moved_s:.1f}s, b ran {b_during} meanwhile (longest pause {gap:.1f}s); "
            f"client: {len(late)} publishes confirmed after the kill, "
            f"slowest {max(late or [0]):.1f}s; "
            f"{held_down} retries held by RabbitMQ while {victim} was down, none "
            f"{released_s:.0f}s after it was back (counts lag ~5s); {victim} restarted in "
            f"{restart_s:.1f}s, "
            f"replicas in sync {sync_s:.1f}s later, {left_at_rejoin} runs still to come then; "
            f"{tally.extra_attempts} extra attempt(s), {retries} publish retries; "
            f"cluster start {self.cluster_start_s:.0f}s")
