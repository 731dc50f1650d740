"""
Tests for quebert.retry: the Cloud Tasks backoff formula and retry limits.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from quebert.errors import ConfigurationError
from quebert.retry import RETRY_FIELDS, RetryPolicy


class DelayTests(SynchronousTestCase):
    """RetryPolicy.delay follows the formula in DESIGN.md."""

    def test_design_example_schedule(self):
        """min 10, max 300, 3 doublings: 10, 20, 40, 80, 160, 240, 300, 300."""
        policy = RetryPolicy(min_backoff=10, max_backoff=300, max_doublings=3)
        self.assertEqual(
            [policy.delay(n) for n in range(1, 9)],
            [10, 20, 40, 80, 160, 240, 300, 300],
        )

    def test_formula_matches_reference_implementation(self):
        """Every retry number gives min(max, min * 2**e * max(k, 1))."""
        for min_backoff, max_backoff, doublings in [(1, 3600, 16), (0.5, 7, 0), (3, 1000, 2)]:
            policy = RetryPolicy(min_backoff=min_backoff, max_backoff=max_backoff,
                                 max_doublings=doublings)
            for n in range(1, 40):
                e = min(n - 1, doublings)
                k = n - e
                expected = min(max_backoff, min_backoff * 2**e * max(k, 1))
                self.assertEqual(policy.delay(n), expected, (min_backoff, doublings, n))

    def test_zero_doublings_grows_linearly(self):
        """With max_doublings 0 the delay is min_backoff * n, capped."""
        policy = RetryPolicy(min_backoff=5, max_backoff=18, max_doublings=0)
        self.assertEqual([policy.delay(n) for n in range(1, 6)], [5, 10, 15, 18, 18])

    def test_zero_min_backoff_retries_at_once(self):
        policy = RetryPolicy(min_backoff=0, max_backoff=0)
        self.assertEqual([policy.delay(n) for n in range(1, 5)], [0, 0, 0, 0])

    def test_retry_numbers_start_at_one(self):
        policy = RetryPolicy()
        self.assertRaises(ValueError, policy.delay, 0)
        self.assertRaises(ValueError, policy.delay, -3)

    def test_cloud_tasks_default_limits(self):
        """
        The defaults shared with Cloud Tasks: max_backoff 3600 s, 16
        doublings, no duration limit, no jitter; quebert's own defaults are
        5 attempts and a 1 s first backoff.
        """
        policy = RetryPolicy()
        self.assertEqual(policy.max_backoff, 3600.0)
        self.assertEqual(policy.max_doublings, 16)
        self.assertEqual(policy.max_retry_duration, 0.0)
        self.assertEqual(policy.jitter, 0.0)
        self.assertEqual(policy.max_attempts, 5)
        self.assertEqual(policy.min_backoff, 1.0)
        self.assertEqual([policy.delay(n) for n in range(1, 6)], [1, 2, 4, 8, 16])
        # 2**11 = 2048 < 3600 < 4096: the cap is reached at retry 13.
        self.assertEqual(policy.delay(12), 2048)
        self.assertEqual(policy.delay(13), 3600)
        self.assertEqual(policy.delay(1000), 3600)

    def test_cloud_tasks_queue_defaults_schedule(self):
        """Cloud Tasks' own queue defaults (0.1 s .. 3600 s, 16 doublings)."""
        policy = RetryPolicy(max_attempts=100, min_backoff=0.1, max_backoff=3600,
                             max_doublings=16)
        delays = [policy.delay(n) for n in range(1, 20)]
        self.assertAlmostEqual(delays[0], 0.1)
        self.assertAlmostEqual(delays[1], 0.2)
        self.assertAlmostEqual(delays[2], 0.4)
        self.assertAlmostEqual(delays[15], 0.1 * 2**15)
        self.assertEqual(delays[-1], 3600)

    def test_huge_retry_numbers_are_cheap_and_capped(self):
        policy = RetryPolicy(min_backoff=1, max_backoff=60, max_doublings=16)
        self.assertEqual(policy.delay(10**9), 60)

    def test_many_doublings_do_not_overflow(self):
        """
        A large max_doublings (a message may set it) must not make late
        retries raise OverflowError: 2**1100 does not fit in a float.
        """
        policy = RetryPolicy(min_backoff=1, max_backoff=60, max_doublings=5000)
        self.assertEqual(policy.delay(1100), 60)
        self.assertEqual(RetryPolicy(min_backoff=0, max_backoff=0,
                                     max_doublings=5000).delay(1100), 0)


class JitterTests(SynchronousTestCase):
    """Jitter shortens a delay by at most the jitter fraction."""

    def test_no_jitter_ignores_rand(self):
        policy = RetryPolicy(min_backoff=10, max_backoff=300, max_doublings=3)
        self.assertEqual(policy.delay(2, rand=lambda: 0.999), 20)

    def test_jitter_bounds_with_injected_rand(self):
        policy = RetryPolicy(min_backoff=10, max_backoff=300, max_doublings=3, jitter=0.5)
        self.assertEqual(policy.delay(2, rand=lambda: 0.0), 20)
        self.assertEqual(policy.delay(2, rand=lambda: 0.5), 15)
        # random() is in [0, 1): the delay never drops to (1 - jitter) * delay
        self.assertGreater(policy.delay(2, rand=lambda: 0.9999999), 10)
        self.assertLessEqual(policy.delay(2, rand=lambda: 1.0), 20)
        self.assertEqual(policy.delay(2, rand=lambda: 1.0), 10)

    def test_full_jitter(self):
        policy = RetryPolicy(min_backoff=8, max_backoff=8, jitter=1.0)
        self.assertEqual(policy.delay(1, rand=lambda: 0.25), 6)

    def test_jitter_uses_random_by_default(self):
        policy = RetryPolicy(min_backoff=10, max_backoff=10, jitter=0.2)
        for _ in range(50):
            value = policy.delay(3)
            self.assertGreaterEqual(value, 8)
            self.assertLessEqual(value, 10)

    @given(
        retry=st.integers(min_value=1, max_value=200),
        jitter=st.floats(min_value=0, max_value=1),
        r=st.floats(min_value=0, max_value=1, exclude_max=True),
    )
    def test_jitter_within_bounds(self, retry, jitter, r):
        policy = RetryPolicy(min_backoff=2, max_backoff=500, max_doublings=5, jitter=jitter)
        plain = RetryPolicy(min_backoff=2, max_backoff=500, max_doublings=5).delay(retry)
        value = policy.delay(retry, rand=lambda: r)
        self.assertLessEqual(value, plain)
        self.assertGreaterEqual(value, plain * (1 - jitter) - 1e-9)


class ShouldRetryTests(SynchronousTestCase):
    """Retrying stops only when both limits are spent."""

    def test_attempt_limit_without_duration_limit(self):
        """Duration 0 = no duration limit: the attempt count alone decides."""
        policy = RetryPolicy(max_attempts=3, max_retry_duration=0)
        self.assertTrue(policy.should_retry(1, 0.0, 10**6))
        self.assertTrue(policy.should_retry(2, 0.0, 10**6))
        self.assertFalse(policy.should_retry(3, 0.0, 0.0))
        self.assertFalse(policy.should_retry(4, 0.0, 0.0))

    def test_unlimited_attempts_without_duration_limit(self):
        policy = RetryPolicy(max_attempts=-1, max_retry_duration=0)
        self.assertTrue(policy.should_retry(10**6, 0.0, 10**9))
        self.assertFalse(policy.attempts_spent(10**6))

    def test_unlimited_attempts_ignore_duration(self):
        """-1 attempts never run out, so the duration alone cannot stop retries."""
        policy = RetryPolicy(max_attempts=-1, max_retry_duration=60)
        self.assertTrue(policy.should_retry(50, 0.0, 10_000.0))

    def test_attempts_spent_but_duration_left(self):
        policy = RetryPolicy(max_attempts=2, max_retry_duration=100)
        self.assertTrue(policy.should_retry(5, 1000.0, 1099.0))
        self.assertFalse(policy.should_retry(5, 1000.0, 1100.0))

    def test_duration_spent_but_attempts_left(self):
        policy = RetryPolicy(max_attempts=10, max_retry_duration=100)
        self.assertTrue(policy.should_retry(2, 1000.0, 5000.0))
        self.assertFalse(policy.should_retry(10, 1000.0, 5000.0))

    def test_unknown_first_attempt_means_duration_left(self):
        policy = RetryPolicy(max_attempts=1, max_retry_duration=100)
        self.assertFalse(policy.duration_spent(None, 10**9))
        self.assertTrue(policy.should_retry(1, None, 10**9))

    def test_no_duration_limit_is_always_spent(self):
        self.assertTrue(RetryPolicy(max_retry_duration=0).duration_spent(None, 0.0))

    def test_single_attempt(self):
        policy = RetryPolicy(max_attempts=1)
        self.assertFalse(policy.should_retry(1, 0.0, 0.0))


class ValidationTests(SynchronousTestCase):
    """Nonsense policies raise ConfigurationError when built."""

    def test_bad_max_attempts(self):
        for value in (0, -2, -100):
            self.assertRaises(ConfigurationError, RetryPolicy, max_attempts=value)

    def test_negative_values(self):
        for field in ("max_retry_duration", "min_backoff", "max_doublings"):
            self.assertRaises(ConfigurationError, RetryPolicy, **{field: -1})
        self.assertRaises(ConfigurationError, RetryPolicy, min_backoff=-1, max_backoff=-1)

    def test_max_backoff_below_min_backoff(self):
        e = self.assertRaises(ConfigurationError, RetryPolicy, min_backoff=10, max_backoff=5)
        self.assertIn("max_backoff", str(e))

    def test_jitter_outside_unit_interval(self):
        for value in (-0.1, 1.01, 5):
            self.assertRaises(ConfigurationError, RetryPolicy, jitter=value)

    def test_error_names_the_field(self):
        e = self.assertRaises(ConfigurationError, RetryPolicy, max_doublings=-1)
        self.assertIn("max_doublings", str(e))

    def test_strings_are_converted(self):
        policy = RetryPolicy(max_attempts="3", min_backoff="2.5", max_backoff="10")
        self.assertEqual((policy.max_attempts, policy.min_backoff), (3, 2.5))

    def test_non_numbers_raise_configuration_error(self):
        """A value that is no number is a ConfigurationError, like every other bad value."""
        self.assertRaises(ConfigurationError, RetryPolicy, max_attempts="five")
        self.assertRaises(ConfigurationError, RetryPolicy, min_backoff="soon")
        self.assertRaises(ConfigurationError, RetryPolicy, max_backoff=None)

    def test_non_finite_values_rejected(self):
        """NaN or infinite backoffs would produce delays no broker can apply."""
        for field in ("min_backoff", "max_backoff", "max_retry_duration"):
            self.assertRaises(ConfigurationError, RetryPolicy, **{field: math.nan})
        self.assertRaises(ConfigurationError, RetryPolicy, max_backoff=math.inf)
        self.assertRaises(ConfigurationError, RetryPolicy, jitter=math.nan)


class ReplaceTests(SynchronousTestCase):
    """replace() and from_mapping()."""

    def test_replace_changes_given_fields(self):
        base = RetryPolicy(max_attempts=5, min_backoff=1, max_backoff=60)
        new = base.replace(max_attempts=9, min_backoff=2)
        self.assertEqual((new.max_attempts, new.min_backoff, new.max_backoff), (9, 2.0, 60.0))
        self.assertEqual(base.max_attempts, 5)

    def test_replace_ignores_none(self):
        base = RetryPolicy(max_attempts=5)
        self.assertEqual(base.replace(max_attempts=None, jitter=None), base)

    def test_replace_unknown_field(self):
        e = self.assertRaises(ConfigurationError, RetryPolicy().replace, retries=3, bogus=1)
        self.assertIn("bogus", str(e))
        self.assertIn("retries", str(e))

    def test_replace_validates(self):
        self.assertRaises(ConfigurationError, RetryPolicy(max_backoff=10).replace,
                          min_backoff=20)
        self.assertRaises(ConfigurationError, RetryPolicy().replace, max_attempts=0)

    def test_from_mapping_uses_base(self):
        base = RetryPolicy(max_attempts=7, max_backoff=100)
        policy = RetryPolicy.from_mapping({"min_backoff": 3, "other": "ignored"}, base)
        self.assertEqual(policy, RetryPolicy(max_attempts=7, max_backoff=100, min_backoff=3))

    def test_from_mapping_without_base_uses_defaults(self):
        policy = RetryPolicy.from_mapping({"max_attempts": -1})
        self.assertEqual(policy, RetryPolicy(max_attempts=-1))

    def test_from_mapping_validates(self):
        self.assertRaises(ConfigurationError, RetryPolicy.from_mapping, {"jitter": 2})

    def test_to_dict_round_trip(self):
        policy = RetryPolicy(max_attempts=3, max_retry_duration=60, min_backoff=2,
                             max_backoff=30, max_doublings=4, jitter=0.1)
        data = policy.to_dict()
        self.assertEqual(set(data), set(RETRY_FIELDS))
        self.assertEqual(RetryPolicy.from_mapping(data), policy)


class PropertyTests(SynchronousTestCase):
    """Properties of delay() for any valid policy."""

    @settings(max_examples=300, deadline=None)
    @given(
        min_backoff=st.floats(min_value=0, max_value=1e6),
        extra=st.floats(min_value=0, max_value=1e7),
        doublings=st.integers(min_value=0, max_value=5000),
        n=st.integers(min_value=1, max_value=10_000),
    )
    def test_monotonic_and_capped(self, min_backoff, extra, doublings, n):
        """delay(n) <= delay(n + 1) <= max_backoff, and delays are never negative."""
        policy = RetryPolicy(min_backoff=min_backoff, max_backoff=min_backoff + extra,
                             max_doublings=doublings)
        first, second = policy.delay(n), policy.delay(n + 1)
        self.assertLessEqual(first, second)
        self.assertLessEqual(second, policy.max_backoff)
        self.assertGreaterEqual(first, 0)

    @settings(max_examples=200, deadline=None)
    @given(
        min_backoff=st.floats(min_value=0.001, max_value=100),
        doublings=st.integers(min_value=0, max_value=30),
    )
    def test_whole_schedule_monotonic(self, min_backoff, doublings):
        policy = RetryPolicy(min_backoff=min_backoff, max_backoff=3600,
                             max_doublings=doublings)
        delays = [policy.delay(n) for n in range(1, 60)]
        self.assertEqual(delays, sorted(delays))
        self.assertEqual(delays[0], min_backoff)
        self.assertTrue(all(d <= 3600 for d in delays))
