"""Tests for quebert.dispatch.retry_after: both forms, clamping, junk."""

from __future__ import annotations

import calendar
import datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from quebert.dispatch.retry_after import MAX_RETRY_AFTER, parse_http_date, parse_retry_after

#: Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date.
RFC_EXAMPLE = 784111777.0
NOW = RFC_EXAMPLE - 60


class RetryAfterTests(SynchronousTestCase):
    def test_delta_seconds(self):
        self.assertEqual(parse_retry_after("120", NOW), 120.0)
        self.assertEqual(parse_retry_after(b" 0 ", NOW), 0.0)
        self.assertEqual(parse_retry_after("1.5", NOW), 1.5)

    def test_http_date_forms(self):
        for value in ("Sun, 06 Nov 1994 08:49:37 GMT",
                      "Sunday, 06-Nov-94 08:49:37 GMT",
                      "Sun Nov  6 08:49:37 1994",
                      "sun, 6 nov 1994 08:49:37 gmt"):
            self.assertEqual(parse_retry_after(value, NOW), 60.0, value)

    def test_http_date_written_by_twisted(self):
        self.assertEqual(parse_retry_after(http.datetimeToString(NOW + 42), NOW), 42.0)

    def test_rfc850_two_digit_year(self):
        now = calendar.timegm(datetime.datetime(2030, 1, 1).timetuple())
        self.assertEqual(parse_http_date("Monday, 01-Jan-80 00:00:00 GMT", now),
                         calendar.timegm(datetime.datetime(2080, 1, 1).timetuple()))
        self.assertEqual(parse_http_date("Monday, 01-Jan-81 00:00:00 GMT", now),
                         calendar.timegm(datetime.datetime(1981, 1, 1).timetuple()))

    def test_past_date_is_now(self):
        self.assertEqual(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", NOW + 3600), 0.0)

    def test_clamped(self):
        self.assertEqual(parse_retry_after("31536000", NOW), MAX_RETRY_AFTER)
        self.assertEqual(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", NOW),
                         MAX_RETRY_AFTER)

    def test_unreadable(self):
        for value in (None, "", "soon", "-5", "+5", "1e3", "nan", "inf", "5 s", "0x10",
                      "Sun, 31 Feb 1994 08:49:37 GMT", "Sun, 06 Foo 1994 08:49:37 GMT",
                      "Sun, 06 Nov 1994 25:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 CET",
                      "1" * 100, "١٢٣"):
            self.assertIsNone(parse_retry_after(value, NOW), value)

    @settings(max_examples=500)
    @given(st.one_of(st.text(max_size=80), st.binary(max_size=80)),
           st.floats(min_value=0, max_value=4e9))
    def test_never_raises(self, value, now):
        delay = parse_retry_after(value, now)
        if delay is not None:
            self.assertTrue(0 <= delay <= MAX_RETRY_AFTER)

    @given(st.integers(min_value=0, max_value=10**12))
    def test_any_delta(self, seconds):
        self.assertEqual(parse_retry_after(str(seconds), NOW), min(seconds, MAX_RETRY_AFTER))

    @given(st.datetimes(min_value=datetime.datetime(1990, 1, 1),
                        max_value=datetime.datetime(2100, 1, 1)))
    def test_any_date(self, moment):
        when = calendar.timegm(moment.replace(microsecond=0).timetuple())
        value = http.datetimeToString(when)
        self.assertEqual(parse_http_date(value.decode(), NOW), when)
