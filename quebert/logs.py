"""
Log observers for ``twistd --logger``.

``twistd --logger quebert.logs.json_observer -n amqp-worker ...`` writes one
JSON object per event to standard output (every task event carries
``task_id``, ``task``, ``queue`` and ``attempt`` fields), for log shippers.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer() -> ILogObserver:
    """One JSON object per log event, on standard output."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
