# -*- test-case-name: tests.test_dispatch_retry_after -*-
"""
Reading a ``Retry-After`` header (RFC 9110, section 10.2.3).

Its value is either a number of seconds (``120``) or an HTTP-date
(``Wed, 21 Oct 2015 07:28:00 GMT``, or the obsolete RFC 850 and asctime
forms).  quebert turns it into a delay in seconds from now, clamped to
``[0, MAX_RETRY_AFTER]``: a server cannot park a task for a year, and a date
in the past means "now".  Anything unreadable is ignored (``None``), as the
RFC asks of recipients.
"""

from __future__ import annotations

import calendar
import datetime
import math
import re
from typing import Optional, Union

#: The longest delay a server may ask for, in seconds (one day).
MAX_RETRY_AFTER = 24 * 3600.0

_DELTA = re.compile(r"^[0-9]{1,16}(\.[0-9]{1,9})?$", re.ASCII)
_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_WEEKDAY = r"(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*"
_TIME = r"(?P<H>[0-9]{2}):(?P<M>[0-9]{2}):(?P<S>[0-9]{2})"
_IMF_FIXDATE = re.compile(
    rf"^{_WEEKDAY},\s+(?P<d>[0-9]{{1,2}})\s+(?P<mon>[a-z]{{3}})\s+(?P<y>[0-9]{{4}})\s+{_TIME}"
    r"\s+gmt$", re.ASCII | re.IGNORECASE)
_RFC850 = re.compile(
    rf"^{_WEEKDAY},\s+(?P<d>[0-9]{{1,2}})-(?P<mon>[a-z]{{3}})-(?P<y>[0-9]{{2}})\s+{_TIME}"
    r"\s+gmt$", re.ASCII | re.IGNORECASE)
_ASCTIME = re.compile(
    rf"^{_WEEKDAY}\s+(?P<mon>[a-z]{{3}})\s+(?P<d>[0-9]{{1,2}})\s+{_TIME}\s+(?P<y>[0-9]{{4}})$",
    re.ASCII | re.IGNORECASE)


def parse_http_date(value: str, now: float) -> Optional[float]:
    """
    Seconds since the epoch of an HTTP-date in any of its three forms, or
    ``None``.  A two-digit RFC 850 year is read as the closest year not more
    than 50 years after ``now`` (RFC 9110, section 5.6.7).
    """
    for pattern in (_IMF_FIXDATE, _RFC850, _ASCTIME):
        match = pattern.fullmatch(value)
        if match:
            break
    else:
        return None
    month = _MONTHS.get(match["mon"].lower())
    if month is None:
        return None
    year = int(match["y"])
    if pattern is _RFC850:
        this_year = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).year
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    try:
        moment = datetime.datetime(year, month, int(match["d"]), int(match["H"]),
                                   int(match["M"]), int(match["S"]))
    except ValueError:
        return None
    return float(calendar.timegm(moment.timetuple()))


def parse_retry_after(value: Union[str, bytes, None], now: float) -> Optional[float]:
    """
    The delay in seconds a ``Retry-After`` value asks for, counted from
    ``now`` (seconds since the epoch), clamped to ``[0, MAX_RETRY_AFTER]``;
    ``None`` when there is no value or it cannot be read.

    Fractional seconds (``1.5``), which the RFC does not allow but some
    servers send, are accepted.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if len(value) > 64:
        return None
    if _DELTA.fullmatch(value):
        delay = float(value)
    else:
        when = parse_http_date(value, now)
        if when is None:
            return None
        delay = when - now
    if not math.isfinite(delay):
        return None
    return min(max(delay, 0.0), MAX_RETRY_AFTER)
