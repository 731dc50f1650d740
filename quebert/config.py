# -*- test-case-name: tests.test_config -*-
"""
Worker configuration: a JSON file, then command-line options on top.

The file takes the guillotina_amqp ``amqp`` block as it is (``host``,
``port``, ``login``, ``password``, ``vhost``, ``heartbeat``, ``exchange``,
``queue``, ``max_running_tasks``, ``delayed_ttl_ms``, ``errored_ttl_ms``,
``state_ttl``, ``max_task_retries``) plus quebert's own keys (among them
``legacy_tasks``: the task names guillotina_amqp producers use, mapped to
registered tasks); see ``docs/configuration.rst`` for every key.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, Mapping, Optional

import attrs

from quebert.amqp.connection import DEFAULT_AMQP_URL, amqp_url, split_amqp_urls
from quebert.amqp.topology import DEFAULT_DELIVERY_LIMIT, DEFAULT_QUEUE_TYPE
from quebert.errors import ConfigurationError
from quebert.mediator import QueueSettings
from quebert.protocol import _NAME_RE, QUEUE_RE
from quebert.retry import RETRY_FIELDS, RetryPolicy

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "default"
#: Largest default concurrency (prefetch count) of a queue: several queues
#: each prefetching ``max_running_tasks`` messages would hold that many
#: times more unacked messages than the worker can run.
MAX_DEFAULT_CONCURRENCY = 100
DEFAULT_MEDIATOR = "quebert.mediator.DelayOnErrorMediator"


@attrs.define
class WorkerConfig:
    """Everything a worker needs to run, already validated."""

    amqp_url: str = DEFAULT_AMQP_URL
    exchange: str = "quebert"
    queue_type: str = DEFAULT_QUEUE_TYPE
    #: Quorum work queues: deliveries of one message before RabbitMQ moves
    #: it to the errored queue (``None``: no limit).
    delivery_limit: Optional[int] = DEFAULT_DELIVERY_LIMIT
    queues: list = attrs.field(factory=list)
    max_running_tasks: int = 100
    threads: Optional[int] = None
    #: Pool processes for ``executor="process"`` tasks (``None``: the number
    #: of CPU cores); no pool when no registered task needs one.
    processes: Optional[int] = None
    #: Tasks a pool process runs before it is replaced (0: no limit).
    max_tasks_per_child: int = 0
    #: Resident memory a pool process may use, in MiB (``None``: no limit).
    process_memory_limit: Optional[int] = None
    state: str = "redis"
    redis_url: str = DEFAULT_REDIS_URL
    state_prefix: str = "quebert:"
    #: Seconds every finished record is kept (0: forever), where
    #: ``state_retention`` does not say otherwise; ``None``: the defaults
    #: by outcome (:data:`quebert.state._records.DEFAULT_RETENTION`).
    state_ttl: Optional[float] = None
    #: Seconds kept by outcome (``succeeded``, ``failed``, ``canceled``).
    state_retention: dict = attrs.field(factory=dict)
    errored_ttl_ms: Optional[int] = 7 * 24 * 3600 * 1000
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    shutdown_timeout: float = 30.0
    #: Seconds without a reactor tick after which the watchdog kills the
    #: worker (exit status 4); ``None``: no watchdog.
    auto_kill_timeout: Optional[float] = None
    mediator: str = DEFAULT_MEDIATOR
    tasks: list = attrs.field(factory=list)
    max_message_size: int = 1024 * 1024
    #: Largest task result kept, in bytes of JSON (0: no limit).
    max_result_size: int = 1024 * 1024
    log_level: str = "info"
    #: Seconds a finished task's unique name stays taken.
    name_tombstone: float = 3600.0
    #: The ``dispatch`` block (URL tasks), a DispatchSettings.
    dispatch: Any = None
    #: HTTP task API: port (None: not served), interface, tokens.
    http_port: Optional[int] = None
    http_interface: str = "127.0.0.1"
    api_tokens: tuple = ()
    api_read_tokens: tuple = ()
    api_anonymous: str = "none"
    #: The HTTP API's caps: open connections, console streams, ``?wait=`` seconds.
    api_max_connections: int = 256
    api_max_streams: int = 32
    api_max_wait: float = 60.0
    #: Seconds between liveness beacons on each AMQP connection (0: none).
    beacon_interval: float = 5.0
    #: Seconds a consumer with room to spare may receive nothing while its
    #: queue has ready messages before it is re-subscribed (0: never).
    stuck_consumer_timeout: float = 60.0
    #: Aliases of registered tasks, ``{legacy name: registered name}``: the
    #: ``func`` names guillotina_amqp producers send (see Registry.alias).
    legacy_tasks: dict = attrs.field(factory=dict)

    def retention(self) -> Dict[str, float]:
        """Seconds a finished record is kept, by outcome (0: forever)."""
        from quebert.state._records import retention

        return retention(self.state_ttl, self.state_retention)

    def dispatch_settings(self) -> Any:
        """The URL-task settings (defaults when the config has no ``dispatch`` block)."""
        from quebert.dispatch import DispatchSettings

        return self.dispatch if self.dispatch is not None else DispatchSettings()

    def concurrency(self) -> tuple[int, str]:
        """
        How many tasks this worker runs at once at most, and what sets that
        number, for messages: ``max_running_tasks``, or its queues'
        concurrencies (prefetch counts) together when they are fewer.
        """
        queues = self.queue_settings()
        prefetch = sum(q.concurrency for q in queues)
        where = f"--max-running-tasks {self.max_running_tasks}"
        if prefetch < self.max_running_tasks:
            return prefetch, (f"{where}, but queue concurrency "
                              f"{', '.join(f'{q.name}:{q.concurrency}' for q in queues)}")
        return self.max_running_tasks, where

    def unreachable_running_tasks(self) -> Optional[str]:
        """
        A sentence when ``max_running_tasks`` can never be reached because
        queues left at their default concurrency (at most
        :data:`MAX_DEFAULT_CONCURRENCY`) prefetch fewer messages together;
        ``None`` otherwise, and when every queue's concurrency was given
        (a choice, not a default).
        """
        queues = self.queue_settings()
        prefetch = sum(q.concurrency for q in queues)
        given = {q["name"] for q in self.queues if q.get("concurrency")}
        defaulted = [q.name for q in queues if q.name not in given]
        if prefetch >= self.max_running_tasks or not defaulted:
            return None
        return (f"--max-running-tasks {self.max_running_tasks} is never reached: the queues "
                f"prefetch {prefetch} messages together, queue(s) {', '.join(defaulted)} at "
                f"the default concurrency of at most {MAX_DEFAULT_CONCURRENCY}. Give them "
                f"a concurrency (--queue NAME:CONCURRENCY, or \"concurrency\" in the config "
                f"file's queue) to run more tasks at once")

    def existing_queues(self) -> frozenset:
        """
        Queues another system declared (``"existing": true``): used as they
        are, declared passively, their arguments left alone.
        """
        return frozenset(q["name"] for q in self.queues if q.get("existing"))

    def queue_settings(self) -> list[QueueSettings]:
        """The queues to consume, with the defaults filled in."""
        queues = self.queues or [{"name": DEFAULT_QUEUE}]
        result = []
        for q in queues:
            retry = self.retry.replace(**{k: q[k] for k in RETRY_FIELDS if k in q})
            result.append(QueueSettings(
                name=q["name"],
                concurrency=int(q.get("concurrency")
                                or min(self.max_running_tasks, MAX_DEFAULT_CONCURRENCY)),
                retry=retry,
                timeout=q.get("timeout"),
                dispatch_deadline=q.get("dispatch_deadline"),
            ))
        return result



def api_config(config: WorkerConfig) -> Any:
    """
    The HTTP API's settings (:class:`quebert.api.config.ApiConfig`) from
    the worker's; a :class:`ConfigurationError` for an API nobody could use.
    """
    # Imported here: the quebert.api package brings the web server, which
    # a worker without --http-port never needs.
    from quebert.api.config import ApiConfig

    return ApiConfig(read_write_tokens=config.api_tokens,
                     read_only_tokens=config.api_read_tokens, anonymous=config.api_anonymous,
                     max_connections=config.api_max_connections,
                     max_streams=config.api_max_streams, max_wait=config.api_max_wait)


#: Where task state can be kept.
STATE_BACKENDS = ("redis", "memory")


def check_state_backend(value: Any, where: str) -> str:
    """``value`` if it names a state backend; ConfigurationError otherwise."""
    if value not in STATE_BACKENDS:
        raise ConfigurationError(
            f"state backend must be 'redis' or 'memory', not {value!r} ({where})")
    return value


def check_log_level(value: Any, where: str) -> str:
    """``value`` if it names a ``twisted.logger`` level; ConfigurationError otherwise."""
    from twisted.logger import LogLevel

    try:
        LogLevel.levelWithName(value)
    except Exception:
        raise ConfigurationError(
            f"unknown log level {value!r} ({where}; one of debug, info, warn, error, "
            "critical)") from None
    return value


#: The shortest reactor stall the watchdog may be set to kill for.
MIN_AUTO_KILL_TIMEOUT = 1.0


def check_auto_kill_timeout(value: float, what: str) -> Optional[float]:
    """The watchdog timeout: 0 turns it off, otherwise at least 1 second."""
    if value == 0:
        return None
    if value < MIN_AUTO_KILL_TIMEOUT:
        raise ConfigurationError(
            f"{what} must be 0 (off) or at least {MIN_AUTO_KILL_TIMEOUT:g} second, not "
            f"{value!r}: a busy but healthy reactor can go that long between ticks")
    return float(value)


def parse_queue_option(value: str) -> dict:
    """``NAME[:CONCURRENCY]`` from the command line."""
    name, _, concurrency = value.partition(":")
    if not QUEUE_RE.fullmatch(name):
        raise ConfigurationError(f"{name!r} is not a valid queue name "
                                 "(letters, digits, _ . : - ; at most 100)")
    queue: dict[str, Any] = {"name": name}
    if concurrency:
        try:
            queue["concurrency"] = int(concurrency)
        except ValueError:
            raise ConfigurationError(f"queue concurrency must be an integer: {value!r}")
        if queue["concurrency"] < 1:
            raise ConfigurationError(f"queue concurrency must be >= 1: {value!r}")
    return queue


def _number(value: Any, what: str, integer: bool = False) -> Any:
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a number, not {value!r}")
    try:
        number = float(value)
        if integer:
            if not number.is_integer():
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if integer else "a number"
        raise ConfigurationError(f"{what} must be {kind}, not {value!r}")
    if not math.isfinite(number):
        raise ConfigurationError(f"{what} must be a finite number, not {value!r}")
    return number


def _positive(value: Any, what: str, integer: bool = False) -> Any:
    number = _number(value, what, integer)
    if number <= 0:
        raise ConfigurationError(f"{what} must be > 0, not {value!r}")
    return number


def parse_retention(value: Any, what: str) -> Dict[str, float]:
    """
    Seconds kept by outcome: a JSON object, or the command line's text
    ``succeeded=3600,failed=604800``.
    """
    if isinstance(value, str):
        pairs = {}
        for part in filter(None, (p.strip() for p in value.split(","))):
            outcome, sep, seconds = part.partition("=")
            if not sep:
                raise ConfigurationError(
                    f"{what} is OUTCOME=SECONDS,... (succeeded, failed, canceled), not {value!r}")
            try:
                pairs[outcome.strip()] = float(seconds)
            except ValueError:
                raise ConfigurationError(
                    f"{what}: {outcome.strip()}'s seconds must be a number, not {seconds!r}")
        value = pairs
    if not isinstance(value, dict):
        raise ConfigurationError(f"{what} must be an object of seconds by outcome "
                                 f"(succeeded, failed, canceled), not {value!r}")
    kept = {outcome: _non_negative(seconds, f"{what}.{outcome}")
            for outcome, seconds in value.items()}
    from quebert.state._records import retention

    try:
        retention(None, kept)
    except ValueError as e:
        raise ConfigurationError(f"{what}: {e}")
    return kept


def _non_negative(value: Any, what: str, integer: bool = False) -> Any:
    number = _number(value, what, integer)
    if number < 0:
        raise ConfigurationError(f"{what} must be >= 0, not {value!r}")
    return number


def load_file(path: str) -> dict:
    """Read a JSON config file with errors a human can act on."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigurationError(f"cannot read config file {path!r}: {e.strerror}")
    except ValueError as e:
        raise ConfigurationError(f"config file {path!r} is not valid JSON: {e}")
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path!r} must hold a JSON object")
    return data


def from_mapping(data: Mapping[str, Any]) -> WorkerConfig:
    """Build a :class:`WorkerConfig` from a parsed config file."""
    config = WorkerConfig()
    amqp = data.get("amqp") or {}
    if not isinstance(amqp, dict):
        raise ConfigurationError("'amqp' must be a JSON object")
    if "url" in amqp:
        # one URL, several separated by commas, or a list of them (cluster nodes)
        config.amqp_url = ",".join(split_amqp_urls(amqp["url"]))
    elif any(k in amqp for k in ("host", "port", "login", "password", "vhost", "heartbeat")):
        config.amqp_url = amqp_url(
            host=amqp.get("host", "127.0.0.1"), port=amqp.get("port", 5672),
            login=amqp.get("login", "guest"), password=amqp.get("password", "guest"),
            vhost=amqp.get("vhost", "/"), heartbeat=amqp.get("heartbeat"),
            ssl=bool(amqp.get("ssl", False)),
        )
    config.exchange = amqp.get("exchange", config.exchange)
    config.queue_type = amqp.get("queue_type", config.queue_type)
    if "delivery_limit" in amqp:
        config.delivery_limit = _non_negative(amqp["delivery_limit"], "amqp.delivery_limit",
                                              integer=True) or None
    if "max_running_tasks" in amqp:
        config.max_running_tasks = _positive(amqp["max_running_tasks"], "max_running_tasks",
                                             integer=True)
    if "errored_ttl_ms" in amqp:
        config.errored_ttl_ms = _non_negative(amqp["errored_ttl_ms"], "amqp.errored_ttl_ms",
                                              integer=True) or None
    if "state_ttl" in amqp:
        config.state_ttl = _non_negative(amqp["state_ttl"], "amqp.state_ttl")

    retry: dict[str, Any] = {}
    if "delayed_ttl_ms" in amqp:
        # guillotina_amqp's fixed retry delay becomes the first backoff.
        retry["min_backoff"] = _non_negative(amqp["delayed_ttl_ms"], "amqp.delayed_ttl_ms") / 1000
        retry["max_backoff"] = max(retry["min_backoff"], config.retry.max_backoff)
    if "max_task_retries" in amqp:
        retry["max_attempts"] = _non_negative(amqp["max_task_retries"], "amqp.max_task_retries",
                                              integer=True) + 1
    top = data.get("retry") or {}
    if not isinstance(top, dict):
        raise ConfigurationError("'retry' must be a JSON object")
    unknown = set(top) - set(RETRY_FIELDS)
    if unknown:
        raise ConfigurationError(f"unknown retry setting(s): {', '.join(sorted(unknown))} "
                                 f"(known: {', '.join(RETRY_FIELDS)})")
    retry.update(top)
    try:
        config.retry = RetryPolicy.from_mapping(retry, config.retry)
    except ConfigurationError as e:
        raise ConfigurationError(f"bad retry settings: {e}")

    queues = data.get("queues")
    if queues is None and "queue" in amqp:
        queues = [{"name": amqp["queue"]}]
    if queues is not None:
        config.queues = _parse_queues(queues, config.retry)

    state = data.get("state") or {}
    if not isinstance(state, dict):
        raise ConfigurationError("'state' must be a JSON object")
    config.state = check_state_backend(state.get("backend", config.state), "state.backend")
    config.redis_url = state.get("url", config.redis_url)
    config.state_prefix = state.get("prefix", config.state_prefix)
    if "ttl" in state:
        config.state_ttl = _non_negative(state["ttl"], "state.ttl")
    if "retention" in state:
        config.state_retention = parse_retention(state["retention"], "state.retention")

    for key in ("shutdown_timeout",):
        if key in data:
            setattr(config, key, _positive(data[key], key))
    if data.get("auto_kill_timeout") is not None:
        config.auto_kill_timeout = check_auto_kill_timeout(
            _non_negative(data["auto_kill_timeout"], "auto_kill_timeout"), "auto_kill_timeout")
    if "max_message_size" in data:
        config.max_message_size = _positive(data["max_message_size"], "max_message_size",
                                            integer=True)
    if "max_result_size" in data:
        config.max_result_size = _non_negative(data["max_result_size"], "max_result_size",
                                               integer=True)
    if "threads" in data:
        config.threads = _positive(data["threads"], "threads", integer=True)
    if data.get("processes") is not None:
        config.processes = _positive(data["processes"], "processes", integer=True)
    if "max_tasks_per_child" in data:
        config.max_tasks_per_child = _non_negative(data["max_tasks_per_child"],
                                                   "max_tasks_per_child", integer=True)
    if data.get("process_memory_limit") is not None:
        config.process_memory_limit = _non_negative(
            data["process_memory_limit"], "process_memory_limit", integer=True) or None
    if "mediator" in data:
        config.mediator = str(data["mediator"])
    if "tasks" in data:
        tasks = data["tasks"]
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ConfigurationError("'tasks' must be a list of module names")
        config.tasks = list(tasks)
    if "log_level" in data:
        config.log_level = check_log_level(data["log_level"], "log_level")
    for key in ("beacon_interval", "stuck_consumer_timeout"):
        if key in data:
            setattr(config, key, _non_negative(data[key], key))
    if "name_tombstone" in data:
        config.name_tombstone = _non_negative(data["name_tombstone"], "name_tombstone")
    if "dispatch" in data:
        from quebert.dispatch import DispatchSettings

        config.dispatch = DispatchSettings.from_config(data["dispatch"])
    api = data.get("api") or {}
    if not isinstance(api, dict):
        raise ConfigurationError("'api' must be a JSON object")
    unknown = set(api) - {"port", "interface", "tokens", "read_only_tokens", "anonymous",
                          "max_connections", "max_streams", "max_wait"}
    if unknown:
        raise ConfigurationError(f"unknown api setting(s): {', '.join(sorted(unknown))}")
    if api.get("port") is not None:
        config.http_port = _non_negative(api["port"], "api.port", integer=True)
    if "interface" in api:
        config.http_interface = str(api["interface"])
    for key, attr in (("tokens", "api_tokens"), ("read_only_tokens", "api_read_tokens")):
        if key in api:
            tokens = api[key]
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise ConfigurationError(f"api.{key} must be a list of strings")
            setattr(config, attr, tuple(tokens))
    if "anonymous" in api:
        config.api_anonymous = str(api["anonymous"])
    for key in ("max_connections", "max_streams"):
        if key in api:
            setattr(config, f"api_{key}", _positive(api[key], f"api.{key}", integer=True))
    if "max_wait" in api:
        config.api_max_wait = _positive(api["max_wait"], "api.max_wait")
    if "legacy_tasks" in data:
        config.legacy_tasks = parse_legacy_tasks(data["legacy_tasks"])
    return config


def parse_legacy_tasks(value: Any) -> dict:
    """
    The ``legacy_tasks`` block: ``{"old.dotted.name": "registered.name"}``,
    both task names.  Whether the registered names exist is checked when the
    worker has imported its tasks (:func:`quebert.worker.apply_legacy_tasks`).
    """
    if not isinstance(value, dict):
        raise ConfigurationError("'legacy_tasks' must be a JSON object of "
                                 "{\"legacy.name\": \"registered.name\"}")
    for old, new in value.items():
        for name in (old, new):
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise ConfigurationError(
                    f"legacy_tasks: {name!r} is not a task name (a letter or _, then up to "
                    "199 of A-Z a-z 0-9 _ . : -)")
    return dict(value)


def _parse_queues(queues: Any, retry: RetryPolicy) -> list[dict]:
    if isinstance(queues, dict):
        items = []
        for name, settings in queues.items():
            if settings is not None and not isinstance(settings, dict):
                raise ConfigurationError(
                    f"settings of queue {name!r} must be a JSON object, not {settings!r}")
            items.append(dict(settings or {}, name=name))
    elif isinstance(queues, list):
        items = []
        for q in queues:
            if isinstance(q, str):
                items.append({"name": q})
            elif isinstance(q, dict):
                items.append(dict(q))
            else:
                raise ConfigurationError(
                    f"each entry of 'queues' must be a name or an object, not {q!r}")
    else:
        raise ConfigurationError("'queues' must be an object or a list")
    result = []
    for q in items:
        name = q.get("name")
        if not isinstance(name, str) or not QUEUE_RE.fullmatch(name):
            raise ConfigurationError(f"{name!r} is not a valid queue name")
        unknown = set(q) - {"name", "concurrency", "timeout", "dispatch_deadline",
                            "existing", *RETRY_FIELDS}
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) for queue {name!r}: {', '.join(sorted(unknown))}"
            )
        if "concurrency" in q:
            q["concurrency"] = _positive(q["concurrency"], f"queues.{name}.concurrency",
                                         integer=True)
        if "existing" in q and not isinstance(q["existing"], bool):
            raise ConfigurationError(
                f"queues.{name}.existing must be true or false, not {q['existing']!r}")
        if q.get("timeout") is not None:
            q["timeout"] = _positive(q["timeout"], f"queues.{name}.timeout")
        if q.get("dispatch_deadline") is not None:
            q["dispatch_deadline"] = _positive(q["dispatch_deadline"],
                                               f"queues.{name}.dispatch_deadline")
        try:
            RetryPolicy.from_mapping(q, retry)  # validate early, on top of the file's policy
        except ConfigurationError as e:
            raise ConfigurationError(f"bad retry settings for queue {name!r}: {e}")
        result.append(q)
    return result
