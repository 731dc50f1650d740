"""
Scenario: a rolling restart of a 3-node RabbitMQ cluster during one batch.

On the 3-node test cluster (``tests/_cluster.py``), default configuration
(quorum queues, no ``--queue-type``): every node is stopped gracefully
(``rabbitmqctl stop``: the VM exits, as for an upgrade) and started
again, one at a time, c1 then c2 then c3; before the next one stops, the
restarted node must be back in the cluster with an online replica of
every quorum queue of the vhost and its replica of the work queue caught
up with the leader, which is what an operator checks between two nodes of
a rolling upgrade.

Two workers and the client are given the three node URLs (the workers in
different orders: c1 first and c2 first), so each stop takes away the
connections of whoever is on that node: worker a moves three times, worker
b twice, the client three times, each to the next node of its list.  A
backlog is published first, then a producer publishes at a steady pace
(one task in ten fails its first run, so retries wait in the delay queues)
all through the restarts, so that tasks are always there to run: the
longest stretch without a task run measures how long the cluster, the
client and the workers together stalled.  Then the suite's accounting.
"""

from __future__ import annotations

import time

from twisted.internet import defer

from tests._cluster import NODES
from tests._worker import sleep
from tests.faults._harness import FaultCase, until

#: Published before the workers start.
BACKLOG = 500
#: Then published at a steady pace through the restarts.
PRODUCED = 1600
PER_SECOND = 25.0
PREFETCH = 20
#: Each task's sleep: 2 workers run at most 2 * PREFETCH / SECONDS = 40
#: tasks a second, more than the producer's pace.
SECONDS = 1.0
#: The longest stretch without a task run, from the first stop to the
#: last node back in sync, at most (1.4-2.0 s measured in 4 runs on 2 cores).
GAP_BOUND = 15.0
#: Seconds a restarted node may take to have its replicas online and in sync.
SYNC_BOUND = 90.0
#: Seconds a worker may take to connect to another node once ``rabbitmqctl
#: stop`` of its node returned (in every run so far it already had: a
#: graceful stop closes the connections first; the stops took 3.6-4.4 s).
MOVE_BOUND = 30.0


class RollingRestartTests(FaultCase):
    scenario = "rolling-restart"
    fault = ("every node of a 3-node cluster stopped and started in turn (rabbitmqctl stop, "
             "then start, in sync before the next) during one batch (quorum queues)")
    on_cluster = True
    timeout = 420

    def test_every_node_restarted_in_turn(self):
        return defer.ensureDeferred(self._test())

    async def _test(self):
        def options(i: int) -> dict:
            return {"seconds": SECONDS, "fail_first": i % 10 == 0}

        ids = await self.publish(BACKLOG, options=options)
        workers = {
            "a": self.worker("a", queues=(f"default:{PREFETCH}",),
                             amqp_url=self.node_urls("c1", "c2", "c3")).start(),
            "b": self.worker("b", queues=(f"default:{PREFETCH}",),
                             amqp_url=self.node_urls("c2", "c3", "c1")).start(),
        }
        for w in workers.values():
            await w.ready()

        def on(node: str) -> list:
            """The workers whose consuming connection is on ``node`` (by their logs)."""
            return sorted(n for n, w in workers.items()
                          if (self.worker_nodes(w) or [None])[-1] == node)

        await until(lambda: on("c1") == ["a"] and on("c2") == ["b"], 30,
                    "worker a on c1, b on c2")
        await until(lambda: len(self.runs) >= 100, 60, "the first runs")
        for queue, info in (await self.quorum_queues()).items():
            self.assertEqual((info["members"], info["online"]), (list(NODES), list(NODES)),
                             queue)

        producer = defer.ensureDeferred(self.publish(PRODUCED, start=BACKLOG, options=options,
                                                     per_second=PER_SECOND))
        await sleep(2.0)
        began = time.time()
        total_runs = BACKLOG + PRODUCED + (BACKLOG + PRODUCED + 9) // 10
        steps = []
        for node in NODES:
            leaving = on(node)
            made = {n: len(self.worker_nodes(w)) for n, w in workers.items()}
            runs_before = len(self.runs)
            self.assertLess(runs_before, total_runs, "the restarts must happen mid-batch")
            stop_began = time.time()
            await self.cluster.stop_node(node, self)
            stopped_at = time.time()

            def moved(leaving: list = leaving, made: dict = made) -> bool:
                return all(len(self.worker_nodes(workers[n])) > made[n] for n in leaving)

            await until(moved, MOVE_BOUND, f"workers {leaving} to leave {node}")
            # (a graceful stop closes the connections first: the workers are
            # usually on another node before rabbitmqctl stop returns)
            moved_s = time.time() - stop_began
            for n, w in workers.items():
                nodes = self.worker_nodes(w)
                if n in leaving:
                    self.assertNotEqual(nodes[-1], node, f"worker {n} reconnected to {node}")
                else:
                    self.assertEqual(len(nodes), made[n],
                                     f"worker {n} reconnected although its node stayed up")
                self.assertTrue(w.alive, f"worker {n} exited:\n" + w.log()[-3000:])
            held = await self.held()
            restart_s = await self.restart_node(node)
            sync_s = await self.wait_in_sync(node, timeout=SYNC_BOUND)
            steps.append(f"{node}: stop {stopped_at - stop_began:.1f}s, {','.join(leaving) or '-'} "
                         f"moved within {moved_s:.1f}s, {held} retries held, start "
                         f"{restart_s:.1f}s, in sync {sync_s:.1f}s")
        ended = time.time()
        self.assertEqual(await self.cluster.running_nodes(), list(NODES))
        published_by_end = sum(1 for sent, _ in self.published.values() if sent <= ended)
        ids.update(await producer)
        # Tasks kept coming until the producer's last publish: a stretch
        # without runs before then is a stall, not a lack of work.
        last_sent = max(sent for sent, _ in self.published.values())
        gap = self.runs.largest_gap(began, min(ended, last_sent))

        records = await self.wait_done(ids, workers=workers.values(), timeout=240)
        expected = {i: 2 if i % 10 == 0 else 1 for i in ids}
        tally = self.tally(records, expected)
        # In flight at each stop: the prefetch of each consuming connection
        # the node took away (a's three, b's two).
        lost = {n: len(self.worker_nodes(w)) - 1 for n, w in workers.items()}
        self.assertEqual(lost, {"a": 3, "b": 2}, "consuming connections lost")
        self.check(tally, duplicate_bound=PREFETCH * sum(lost.values()), records=records)
        await self.assert_queues()
        self.recovered(gap, GAP_BOUND, "longest stretch without a task run, first stop to "
                                       "last node in sync")
        self.assertGreaterEqual(self.client.broker.publishing.connected_count, 4,
                                "the client's connection moved at every stop of its node")
        retries = sum(w.log().count("; retry #") for w in workers.values())
        slowest = max(confirmed - sent for sent, confirmed in self.published.values())
        await self.stop_workers(*workers.values())
        await self.assert_queues()
        self.passed(
            f"{'; '.join(steps)}; rolling restart {ended - began:.0f}s, "
            f"{published_by_end - BACKLOG} published meanwhile (slowest confirm {slowest:.1f}s); "
            f"client connections {self.client.broker.publishing.connected_count}; "
            f"{tally.extra_attempts} extra attempt(s), {retries} worker publish retries; "
            f"cluster start {self.cluster_start_s:.0f}s")
