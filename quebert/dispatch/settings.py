# -*- test-case-name: tests.test_dispatch_policy -*-
"""
The ``dispatch`` block of a worker's JSON config file, read and checked.

::

    "dispatch": {
        "allow_schemes": ["https"],
        "allow_hosts": ["*.example.com"],
        "deny_networks": ["private"],
        "max_connections": 50,
        "dispatch_deadline": 120,
        "max_dispatches_per_second": 20,
        "queues": {"emails": {"max_concurrent_dispatches": 2}},
        "credentials": [{"url_prefix": "http://127.0.0.1:8080/db/",
                         "token_env": "GUILLOTINA_SERVICE_TOKEN"}]
    }

The limit keys at the top of the block are the defaults of every queue; a
queue's block under ``"queues"`` overrides them for that queue.

``max_connections`` and ``max_connections_per_host`` default to the
worker's concurrency (:meth:`DispatchSettings.connection_limits`): a worker
told to run 500 tasks at once sends up to 500 requests at once, to one host
if they all go there, instead of 10 without a word.  Setting either one
keeps it; when a set one is below the worker's concurrency the worker says
so at start-up (:meth:`DispatchSettings.capped_concurrency`).  A target is
protected by the limits made for it: a queue's ``max_concurrent_dispatches``
and ``max_dispatches_per_second``, or an explicit
``max_connections_per_host``.
``"credentials"`` lists the worker's service credentials
(:mod:`quebert.dispatch.credentials`): they are validated here, but their
tokens are read only when the worker builds its dispatcher
(:meth:`DispatchSettings.dispatcher`), so a process that only checks URLs
(``quebert-api``) never needs them.  See ``docs/url-tasks.rst`` for every key.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import attrs

from quebert.dispatch.credentials import CredentialRule, ServiceCredentials
from quebert.dispatch.limits import QueueLimits
from quebert.dispatch.policy import URLPolicy
from quebert.errors import ConfigurationError
from quebert.protocol import DEFAULT_DISPATCH_DEADLINE

#: Requests on the wire at once when neither the config nor the worker's
#: concurrency says (a dispatcher built outside a worker).
DEFAULT_MAX_CONNECTIONS = 100

_OWN_KEYS = ("max_connections", "max_connections_per_host", "connect_timeout",
             "dispatch_deadline", "queues", "credentials")
CONFIG_KEYS = URLPolicy.CONFIG_KEYS + QueueLimits.CONFIG_KEYS + _OWN_KEYS


def _positive(mapping: Mapping[str, Any], key: str, default: Any, integer: bool) -> Any:
    if key not in mapping:
        return default
    value = mapping[key]
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and integer:
        ok = float(value).is_integer()
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "an integer" if integer else "a number"
        raise ConfigurationError(f"dispatch.{key} must be {kind} > 0, not {value!r}")
    return int(value) if integer else float(value)


@attrs.frozen
class DispatchSettings:
    """Everything the ``dispatch`` block configures, already validated."""

    policy: URLPolicy = URLPolicy()
    default_limits: QueueLimits = QueueLimits()
    limits: Mapping[str, QueueLimits] = attrs.field(factory=dict, hash=False)
    #: Requests on the wire at once, all hosts; ``None``: the worker's concurrency.
    max_connections: Optional[int] = None
    #: Requests on the wire at once to one ``scheme://host:port``; ``None``:
    #: as many as ``max_connections``.
    max_connections_per_host: Optional[int] = None
    connect_timeout: float = 10.0
    dispatch_deadline: float = DEFAULT_DISPATCH_DEADLINE
    #: Service credential rules (tokens not read yet), in config order.
    credentials: tuple = ()

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any]) -> DispatchSettings:
        """Read a ``dispatch`` block; unknown keys and bad values raise ConfigurationError."""
        if not isinstance(mapping, Mapping):
            raise ConfigurationError("'dispatch' must be a JSON object")
        unknown = set(mapping) - set(CONFIG_KEYS)
        if unknown:
            raise ConfigurationError(
                f"unknown dispatch setting(s): {', '.join(sorted(unknown))} "
                f"(known: {', '.join(CONFIG_KEYS)})")
        policy = URLPolicy.from_config(mapping)
        try:
            defaults = QueueLimits.from_config(mapping)
        except ConfigurationError as e:
            raise ConfigurationError(f"dispatch: {e}")
        queues = mapping.get("queues")
        if queues is None:
            queues = {}
        if not isinstance(queues, Mapping):
            raise ConfigurationError("dispatch.queues must be an object of queue names")
        limits = {}
        for name, block in queues.items():
            if not isinstance(block, Mapping):
                raise ConfigurationError(f"dispatch.queues.{name} must be a JSON object")
            extra = set(block) - set(QueueLimits.CONFIG_KEYS)
            if extra:
                raise ConfigurationError(
                    f"unknown setting(s) in dispatch.queues.{name}: {', '.join(sorted(extra))} "
                    f"(known: {', '.join(QueueLimits.CONFIG_KEYS)})")
            try:
                limits[name] = QueueLimits.from_config(block, defaults)
            except ConfigurationError as e:
                raise ConfigurationError(f"dispatch.queues.{name}: {e}")
        return cls(
            policy=policy, default_limits=defaults, limits=limits,
            credentials=_credential_rules(mapping.get("credentials", [])),
            max_connections=_positive(mapping, "max_connections", None, True),
            max_connections_per_host=_positive(mapping, "max_connections_per_host", None, True),
            connect_timeout=_positive(mapping, "connect_timeout", 10.0, False),
            dispatch_deadline=_positive(mapping, "dispatch_deadline",
                                        DEFAULT_DISPATCH_DEADLINE, False),
        )

    def load_credentials(self, environ: Optional[Mapping[str, str]] = None
                         ) -> ServiceCredentials:
        """
        Read every credential rule's token (from ``environ``, default
        ``os.environ``, or its file); ConfigurationError, naming the
        variable or file and never the value, when one is missing or empty.
        """
        return ServiceCredentials.load(self.credentials, environ)

    def connection_limits(self, concurrency: Optional[int] = None) -> tuple[int, int]:
        """
        ``(max_connections, max_connections_per_host)`` for a worker running
        at most ``concurrency`` tasks at once: the configured values, and
        for those not configured the worker's concurrency (so that the
        pool never caps below what the worker was told to run), or
        :data:`DEFAULT_MAX_CONNECTIONS` when ``concurrency`` is unknown.
        """
        total = self.max_connections or concurrency or DEFAULT_MAX_CONNECTIONS
        return total, self.max_connections_per_host or total

    def capped_concurrency(self, concurrency: int, where: str) -> list[str]:
        """
        Sentences saying which connection limits keep URL tasks below the
        ``concurrency`` of a worker (whose source ``where`` names, as
        ``--max-running-tasks 500``), and which key raises each: empty when
        none does.  Only a configured limit can, since an unset one follows
        the worker's concurrency.
        """
        total, per_host = self.connection_limits(concurrency)
        found = []
        if total < concurrency:
            found.append(
                f"URL tasks: at most {total} requests are sent at once (dispatch."
                f"max_connections), fewer than the {concurrency} tasks this worker runs at "
                f"once ({where}); the other URL tasks wait for a connection. Raise "
                f"\"max_connections\" in the config file's \"dispatch\" block (or leave it "
                f"out: it then follows the worker's concurrency)")
        if per_host < min(total, concurrency):
            found.append(
                f"URL tasks: at most {per_host} requests are sent at once to one host "
                f"(dispatch.max_connections_per_host), fewer than the {min(total, concurrency)} "
                f"tasks this worker runs at once ({where}); URL tasks to one host wait for "
                f"one another beyond that. Raise \"max_connections_per_host\" in the config "
                f"file's \"dispatch\" block (or leave it out: it then follows the worker's "
                f"concurrency)")
        return found

    def dispatcher(self, reactor: Any, *, concurrency: Optional[int] = None,
                   **kwargs: Any) -> Any:
        """
        A :class:`~quebert.dispatch.URLDispatcher` with these settings
        (``kwargs`` win), for a worker running at most ``concurrency``
        tasks at once (see :meth:`connection_limits`).  Reads the
        credentials' tokens unless ``kwargs`` gives ``credentials``: a
        missing one raises ConfigurationError, so the worker stops at
        start-up rather than at its first URL task.
        """
        from quebert.dispatch.dispatcher import URLDispatcher

        if "credentials" not in kwargs:
            kwargs["credentials"] = self.load_credentials()
        total, per_host = self.connection_limits(concurrency)
        options: dict[str, Any] = dict(
            policy=self.policy, limits=self.limits, default_limits=self.default_limits,
            max_connections=total, max_connections_per_host=per_host,
            connect_timeout=self.connect_timeout)
        options.update(kwargs)
        return URLDispatcher(reactor, **options)


def _credential_rules(entries: Any) -> tuple:
    """``dispatch.credentials``: a list of rules, no two for the same prefix."""
    if not isinstance(entries, list):
        raise ConfigurationError("dispatch.credentials must be a list of objects")
    rules: list[CredentialRule] = []
    for index, block in enumerate(entries):
        rule = CredentialRule.from_config(block, f"dispatch.credentials[{index}]")
        for other in rules:
            if other.url_prefix == rule.url_prefix:
                raise ConfigurationError(
                    f"dispatch.credentials[{index}]: the prefix {rule.url_prefix!r} already "
                    "has a rule; one credential per prefix")
        rules.append(rule)
    return tuple(rules)
