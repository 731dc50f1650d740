"""Tests for quebert.worker.tune_gc: the collector settings of a worker process."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from quebert import worker


class FakeGC:
    def __init__(self, threshold):
        self.threshold = threshold
        self.calls = []

    def collect(self):
        self.calls.append("collect")

    def freeze(self):
        self.calls.append("freeze")

    def get_threshold(self):
        return self.threshold

    def set_threshold(self, *threshold):
        self.calls.append("set_threshold")
        self.threshold = threshold


class TuneGCTests(SynchronousTestCase):
    def test_freezes_and_raises_the_young_threshold(self):
        fake = FakeGC((700, 10, 10))
        self.patch(worker, "gc", fake)
        worker.tune_gc()
        self.assertEqual(fake.calls, ["collect", "freeze", "set_threshold"])
        self.assertEqual(fake.threshold, (worker.GC_THRESHOLD, 10, 10))

    def test_keeps_a_higher_threshold(self):
        fake = FakeGC((50000, 20, 5))
        self.patch(worker, "gc", fake)
        worker.tune_gc()
        self.assertEqual(fake.calls, ["collect", "freeze"])
        self.assertEqual(fake.threshold, (50000, 20, 5))
