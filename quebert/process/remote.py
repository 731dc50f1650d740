# -*- test-case-name: tests.test_process -*-
"""
A task's exception from a pool child, raised again in the worker.

The worker records a failed attempt by its exception's type, message and
traceback, and decides on a retry by its class (a
:class:`~quebert.errors.Reject` fails at once).  So an error a child reports
is raised in the worker as an exception that keeps all of that: its class is
a subclass of the child's class when the worker knows that class already (it
imported the same task modules; nothing is imported by a name a child sent),
named like it, with the child's message as ``str()`` and the child's
traceback text as ``remote_traceback``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

__all__ = ["RemoteTaskError", "remote_exception"]


class RemoteTaskError(Exception):
    """
    Mixed into every exception rebuilt from a child's report: the child's
    message, and the traceback text of the child (``remote_traceback``).
    """

    remote_traceback: Optional[str] = None
    _remote_message: str = ""

    def __str__(self) -> str:
        return self._remote_message

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}({self._remote_message!r})"


_classes: dict = {}


def _known_class(module: str, qualname: str) -> Optional[type]:
    """The exception class ``module.qualname`` if this process has it, never importing."""
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if target is None or part.startswith("<"):
            return None
        target = getattr(target, part, None)
    if isinstance(target, type) and issubclass(target, Exception):
        return target
    return None


def _class_for(module: str, qualname: str) -> type:
    key = (module, qualname)
    cls = _classes.get(key)
    if cls is not None:
        return cls
    namespace = {"__module__": module, "__qualname__": qualname,
                 "__str__": RemoteTaskError.__str__, "__repr__": RemoteTaskError.__repr__}
    name = qualname.rpartition(".")[2]
    known = _known_class(module, qualname)
    cls = None
    if known is not None:
        try:
            cls = type(name, (known, RemoteTaskError), namespace)
            cls.__new__(cls)
        except Exception:
            cls = None  # a layout or constructor we cannot mix into: keep the name only
    if cls is None:
        cls = type(name, (RemoteTaskError,), namespace)
    if len(_classes) < 1000:
        _classes[key] = cls
    return cls


def remote_exception(error: dict) -> Exception:
    """The exception to raise in the worker for a child's ``error`` report."""
    module = str(error.get("module") or "builtins")
    qualname = str(error.get("qualname") or "Exception")
    message = str(error.get("message") or "")
    cls = _class_for(module, qualname)
    exc = cls.__new__(cls)
    exc.args = (message,)
    exc._remote_message = message
    exc.remote_traceback = error.get("traceback") or None
    return exc
