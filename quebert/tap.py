# -*- test-case-name: tests.test_tap -*-
"""
``twistd amqp-worker``: options and the service maker.

Command-line options override the config file; every error says what to
change.
"""

from __future__ import annotations

import math
import os
from typing import Any

from twisted.python import usage

from quebert.amqp.connection import split_amqp_urls
from quebert.amqp.topology import Topology
from quebert.config import (
    WorkerConfig,
    api_config,
    check_auto_kill_timeout,
    check_log_level,
    check_state_backend,
    from_mapping,
    load_file,
    parse_queue_option,
    parse_retention,
)
from quebert.errors import ConfigurationError
from quebert.state.redis import parse_redis_url
from quebert.worker import WorkerService, import_tasks, load_mediator_class, tune_gc


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a quebert worker: consume tasks from RabbitMQ, run them, retry failures "
        "through broker-side delay queues and record their state in Redis."
    )
    optParameters = [
        ["config", "c", None, "JSON config file (guillotina_amqp-style 'amqp' block)."],
        ["amqp-url", None, None, "AMQP URL, or the URLs of a cluster's nodes separated by "
         "commas [default: amqp://guest:guest@127.0.0.1:5672/]."],
        ["redis-url", None, None, "Redis URL for task state [default: redis://127.0.0.1:6379/0]."],
        ["state", None, None, "State backend: redis or memory [default: redis]."],
        ["state-prefix", None, None, "Key prefix of task state in Redis [default: quebert:]."],
        ["max-running-tasks", None, None, "Tasks run at once by this worker, all queues."],
        ["threads", None, None, "Threads for synchronous tasks [default: min(max, 50)]."],
        ["processes", None, None, "Pool processes for executor='process' tasks "
         "[default: the number of CPU cores]."],
        ["max-tasks-per-child", None, None, "Tasks a pool process runs before it is "
         "replaced; 0: no limit [default: 0]."],
        ["process-memory-limit", None, None, "Resident memory (MiB) a pool process may use; "
         "over it, its task fails and it is replaced; 0: no limit [default: 0]."],
        ["mediator", None, None, "Dotted name of the Mediator class to use."],
        ["shutdown-timeout", None, None, "Seconds running tasks get to finish on stop."],
        ["auto-kill-timeout", None, None, "Exit (status 4) when the reactor has not run for "
         "this many seconds: a task blocks it [default: 0, off]."],
        ["exchange", None, None, "Main exchange name [default: quebert]."],
        ["queue-type", None, None, "quorum or classic queues [default: quorum]."],
        ["delivery-limit", None, None, "Quorum work queues: deliveries of one message "
         "before RabbitMQ moves it to the errored queue; 0 disables [default: 20]."],
        ["max-message-size", None, None, "Largest message body accepted, in bytes "
         "[default: 1048576]."],
        ["max-result-size", None, None, "Largest task result kept, in bytes of JSON; a "
         "larger one fails its task; 0: no limit [default: 1048576]."],
        ["log-level", None, None, "Lowest level of per-task events to log [default: info]."],
        ["name-tombstone", None, None, "Seconds a finished task's unique name stays taken "
         "[default: 3600]."],
        ["state-retention", None, None, "Seconds finished records are kept, by outcome: "
         "OUTCOME=SECONDS,... (0: forever) [default: succeeded=3600,failed=604800,"
         "canceled=604800]."],
        ["beacon-interval", None, None, "Seconds between liveness beacons on each AMQP "
         "connection; 0 disables [default: 5]."],
        ["stuck-consumer-timeout", None, None, "Seconds a consumer with spare capacity may "
         "receive nothing while its queue has ready messages before it is re-subscribed; "
         "0 disables [default: 60]."],
        ["http-port", None, None, "Serve the HTTP task API, and Prometheus metrics at "
         "/metrics, on this port (0: any free port)."],
        ["http-interface", None, None, "Address the HTTP API listens on [default: 127.0.0.1]."],
        ["api-token", None, None, "Read-write bearer token of the HTTP API "
         "[env QUEBERT_API_TOKEN]."],
        ["api-read-token", None, None, "Read-only bearer token of the HTTP API "
         "[env QUEBERT_API_READ_TOKEN]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["tasks"] = []
        self["queues"] = []

    def opt_tasks(self, module: str) -> None:
        """Module that registers tasks (repeatable)."""
        self["tasks"].append(module)

    def opt_queue(self, value: str) -> None:
        """Queue to consume, NAME[:CONCURRENCY] (repeatable) [default: default]."""
        try:
            self["queues"].append(parse_queue_option(value))
        except ConfigurationError as e:
            raise usage.UsageError(str(e))

    #: Whether the process sends URL tasks, so needs the service tokens of
    #: ``dispatch.credentials`` (``quebert-api`` only checks URLs: it does not).
    sends_url_tasks = True

    def postOptions(self) -> None:
        try:
            self["worker_config"] = build_config(self)
            if self.sends_url_tasks:
                # A missing token is a usage error now, not a traceback later.
                self["worker_config"].dispatch_settings().load_credentials()
        except ConfigurationError as e:
            raise usage.UsageError(str(e))


def _int(value: str, flag: str, minimum: int = 1) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigurationError(f"--{flag} must be an integer, not {value!r}")
    if number < minimum:
        raise ConfigurationError(f"--{flag} must be at least {minimum}, not {value!r}")
    return number


def _float(value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigurationError(f"--{flag} must be a number, not {value!r}")
    if not math.isfinite(number):
        raise ConfigurationError(f"--{flag} must be a finite number, not {value!r}")
    if number < 0:
        raise ConfigurationError(f"--{flag} must be >= 0, not {value!r}")
    return number


def build_config(options: Any) -> WorkerConfig:
    """The config file (if any) with the command line on top."""
    config = from_mapping(load_file(options["config"])) if options["config"] else WorkerConfig()
    if options["amqp-url"]:
        config.amqp_url = options["amqp-url"]
    if options["redis-url"]:
        config.redis_url = options["redis-url"]
        if not options["state"]:
            config.state = "redis"
    if options["state"]:
        config.state = check_state_backend(options["state"], "--state")
    if options["state-prefix"]:
        config.state_prefix = options["state-prefix"]
    if options["max-running-tasks"]:
        config.max_running_tasks = _int(options["max-running-tasks"], "max-running-tasks")
    if options["threads"]:
        config.threads = _int(options["threads"], "threads")
    if options["processes"]:
        config.processes = _int(options["processes"], "processes")
    if options["max-tasks-per-child"] is not None:
        config.max_tasks_per_child = _int(options["max-tasks-per-child"],
                                          "max-tasks-per-child", minimum=0)
    if options["process-memory-limit"] is not None:
        config.process_memory_limit = _int(options["process-memory-limit"],
                                           "process-memory-limit", minimum=0) or None
    if options["mediator"]:
        config.mediator = options["mediator"]
    if options["shutdown-timeout"]:
        config.shutdown_timeout = _float(options["shutdown-timeout"], "shutdown-timeout")
    if options["auto-kill-timeout"] is not None:
        config.auto_kill_timeout = check_auto_kill_timeout(
            _float(options["auto-kill-timeout"], "auto-kill-timeout"), "--auto-kill-timeout")
    if options["exchange"]:
        config.exchange = options["exchange"]
    if options["queue-type"]:
        config.queue_type = options["queue-type"]
    if options["delivery-limit"] is not None:
        limit = _int(options["delivery-limit"], "delivery-limit")
        if limit < 0:
            raise usage.UsageError(f"--delivery-limit must be 0 or more, not {limit}")
        config.delivery_limit = limit or None
    if options["max-result-size"] is not None:
        config.max_result_size = _int(options["max-result-size"], "max-result-size",
                                      minimum=0)
    if options["max-message-size"]:
        config.max_message_size = _int(options["max-message-size"], "max-message-size")
    if options["log-level"]:
        config.log_level = check_log_level(options["log-level"], "--log-level")
    if options["name-tombstone"]:
        config.name_tombstone = _float(options["name-tombstone"], "name-tombstone")
    if options["state-retention"]:
        config.state_retention = {**config.state_retention, **parse_retention(
            options["state-retention"], "--state-retention")}
    if options["beacon-interval"] is not None:
        config.beacon_interval = _float(options["beacon-interval"], "beacon-interval")
    if options["stuck-consumer-timeout"] is not None:
        config.stuck_consumer_timeout = _float(options["stuck-consumer-timeout"],
                                               "stuck-consumer-timeout")
    if options["http-port"] is not None:
        try:
            config.http_port = int(options["http-port"])
        except ValueError:
            config.http_port = -1
    if config.http_port is not None and not 0 <= config.http_port <= 65535:
        raise ConfigurationError(
            f"the HTTP API port must be 0-65535 (0: any free port), not "
            f"{options['http-port'] if options['http-port'] is not None else config.http_port!r}")
    if options["http-interface"]:
        config.http_interface = options["http-interface"]
    token = options["api-token"] or os.environ.get("QUEBERT_API_TOKEN")
    if token:
        config.api_tokens = tuple(config.api_tokens) + (token,)
    read_token = options["api-read-token"] or os.environ.get("QUEBERT_API_READ_TOKEN")
    if read_token:
        config.api_read_tokens = tuple(config.api_read_tokens) + (read_token,)
    if config.http_port is not None:
        api_config(config)  # refuses an API nobody could use, before the reactor runs
    config.tasks = list(config.tasks) + list(options["tasks"])
    if options["queues"]:
        config.queues = list(options["queues"])
    # Validate everything that can be validated before the reactor runs.
    split_amqp_urls(config.amqp_url)
    Topology(exchange=config.exchange, queue_type=config.queue_type,
             delivery_limit=config.delivery_limit)
    if config.state == "redis":
        parse_redis_url(config.redis_url)
    import_tasks(config.tasks)
    load_mediator_class(config.mediator)
    config.queue_settings()
    return config


def makeService(options: Options):
    """Build the worker service for ``twistd``."""
    try:
        service = WorkerService(options["worker_config"])
    except ConfigurationError as e:
        raise usage.UsageError(str(e))
    tune_gc()
    return service
