# -*- test-case-name: tests.test_dispatch -*-
"""
URL tasks: HTTP requests sent by the worker, App Engine push-queue style.

:class:`URLDispatcher` sends a task's :class:`URLRequest` and judges the
answer (any 2xx succeeds, everything else is a retryable
``DispatchError``, redirects are not followed), within a
:class:`URLPolicy` (which URLs and addresses may be requested, how big
requests and answers may be) and per-queue :class:`QueueLimits`
(concurrency and rate).  :class:`ServiceCredentials` are the worker's own
tokens, added to requests under configured URL prefixes so that no
credential travels in a task.  ``docs/url-tasks.rst`` has the rules and the
config keys.

Modules: ``policy`` (guardrails), ``connect`` (resolve, check, connect by
address; the bounded pool), ``credentials`` (service tokens), ``limits``
(semaphore and token bucket), ``retry_after`` (the header's parser),
``dispatcher`` (the request and its outcome), ``settings`` (the config
file's ``dispatch`` block).
"""

from quebert.dispatch.credentials import CredentialRule, ServiceCredentials
from quebert.dispatch.dispatcher import (
    DispatchResult,
    DispatchTimeout,
    URLDispatcher,
    URLRequest,
)
from quebert.dispatch.limits import QueueLimits
from quebert.dispatch.policy import (
    DEFAULT_DENY_HOSTS,
    DEFAULT_DENY_NETWORKS,
    LOOPBACK_NETWORKS,
    PRIVATE_NETWORKS,
    URLPolicy,
)
from quebert.dispatch.retry_after import MAX_RETRY_AFTER, parse_retry_after
from quebert.dispatch.settings import DEFAULT_DISPATCH_DEADLINE, DispatchSettings

__all__ = [
    "CredentialRule",
    "DEFAULT_DENY_HOSTS",
    "DEFAULT_DENY_NETWORKS",
    "DEFAULT_DISPATCH_DEADLINE",
    "DispatchResult",
    "DispatchSettings",
    "DispatchTimeout",
    "LOOPBACK_NETWORKS",
    "MAX_RETRY_AFTER",
    "PRIVATE_NETWORKS",
    "QueueLimits",
    "ServiceCredentials",
    "URLDispatcher",
    "URLPolicy",
    "URLRequest",
    "parse_retry_after",
]
