"""
The default client: the one that calling a ``@task`` function publishes through.

It is kept here, below both :mod:`quebert.registry` (whose
:class:`~quebert.registry.TaskFunction` publishes through it) and
:mod:`quebert.client` (which makes clients, and whose public
``get_default_client``/``set_default_client`` read and write this one), so
that imports go one way: ``client -> registry -> _default_client``.

When none was set, the first look-up makes one with the factory the
``quebert`` package registers when it is imported (``Client`` on
``$QUEBERT_AMQP_URL``): the package is the one module that may import all
the others, and it is always imported before any of them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from quebert.errors import ConfigurationError

_client: Any = None
_factory: Optional[Callable[[], Any]] = None


def set_client(client: Any) -> None:
    """Make ``client`` the default one; ``None`` forgets the current one."""
    global _client
    _client = client


def set_factory(factory: Optional[Callable[[], Any]]) -> None:
    """What makes the default client on first use when none was set."""
    global _factory
    _factory = factory


def get_client() -> Any:
    """
    The default client, made by the factory on first use when none was set.

    :raises ConfigurationError: none was set and there is no factory.
    """
    global _client
    if _client is None:
        if _factory is None:
            raise ConfigurationError(
                "there is no default client: give one to quebert.set_default_client()")
        _client = _factory()
    return _client
