# -*- test-case-name: tests.test_process -*-
"""
What the worker and its pool children say to each other, over AMP.

One command runs one task: :class:`RunTask` carries the registered name,
the arguments and the running task's identity (for
:func:`quebert.current_task` in the child) as JSON, and answers with the
outcome as JSON: ``{"result": ...}`` or ``{"error": {...}}`` describing the
exception the task raised.  :class:`ProcessTasks` asks a child which
process tasks it registered, so that the worker refuses to start when a
child would not know a task the worker routes to it.

An AMP value holds at most 64 KiB; arguments and results may be larger (a
message body may reach the worker's ``max_message_size``), so JSON travels
as :class:`JSONValue`, split over as many keys as it needs.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.protocols import amp

__all__ = ["JSONValue", "ProcessTasks", "RunTask"]

#: Bytes per AMP value (AMP's own limit is 65535).
_CHUNK = 0xFFFF


class JSONValue(amp.Argument):
    """
    A JSON-serialisable value of any size: encoded once, split over the keys
    ``name``, ``name.1``, ``name.2``... and joined again on the other side.
    A ``bytes`` value is taken as JSON already encoded (the child encodes a
    result itself, to tell a result that is not JSON from a broken pipe).
    """

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = self.retrieve(objects, amp._wireNameToPythonIdentifier(name), proto)
        if isinstance(value, bytes):
            data = value
        else:
            data = json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
        chunks = [data[i:i + _CHUNK] for i in range(0, len(data), _CHUNK)] or [b""]
        strings[name] = chunks[0]
        for number, chunk in enumerate(chunks[1:], 1):
            strings[name + b".%d" % number] = chunk

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        parts = [self.retrieve(strings, name, proto)]
        number = 1
        while True:
            key = name + b".%d" % number
            if key not in strings:
                break
            parts.append(strings.pop(key))
            number += 1
        objects[amp._wireNameToPythonIdentifier(name)] = json.loads(b"".join(parts))


class RunTask(amp.Command):
    """
    Run registered task ``name`` once in the child.  ``call`` is the
    worker's number for this call (it names the call in the pool's
    bookkeeping); ``current`` is what :func:`quebert.current_task` returns
    in the child (``None`` outside a worker's attempt).
    """

    arguments = [
        (b"call", amp.Integer()),
        (b"name", amp.Unicode()),
        (b"args", JSONValue()),
        (b"kwargs", JSONValue()),
        (b"current", JSONValue()),
    ]
    response = [(b"outcome", JSONValue())]


class ProcessTasks(amp.Command):
    """The names of the ``executor="process"`` tasks the child registered, and its pid."""

    response = [(b"names", JSONValue()), (b"pid", amp.Integer())]
