# -*- test-case-name: tests.test_api -*-
"""
:class:`ApiConfig`: who may use the HTTP task API and how much it accepts.

Authentication is by bearer token.  Read-only tokens may use every ``GET``;
writes (``POST``, ``DELETE``) need a read-write token.  An API with no token
at all is refused unless ``anonymous`` says so explicitly, so that a
forgotten option never silently opens the API to anyone who can reach the
port.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import attrs

from quebert.errors import ConfigurationError

#: Access levels, from least to most.
NONE = "none"
READ_ONLY = "read-only"
READ_WRITE = "read-write"
ACCESS_LEVELS = (NONE, READ_ONLY, READ_WRITE)

DEFAULT_MAX_BODY_SIZE = 1024 * 1024


def _tokens(values: Iterable[str]) -> Tuple[str, ...]:
    if isinstance(values, (str, bytes)):
        raise ConfigurationError("tokens must be given as a sequence of strings, not one string")
    tokens = tuple(values)
    for token in tokens:
        if not isinstance(token, str) or not token:
            raise ConfigurationError("every API token must be a non-empty string")
        if not token.isascii() or not token.isprintable() or " " in token:
            # RFC 6750 b64token: what a client can put after "Bearer ".
            raise ConfigurationError(
                "API tokens must be printable ASCII without spaces (RFC 6750 bearer tokens)"
            )
    return tokens


def _positive(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{attribute.name} must be > 0, not {value!r}")


@attrs.frozen(repr=False)
class ApiConfig:
    """
    Settings of the HTTP task API.

    :param read_write_tokens: bearer tokens that may do everything.
    :param read_only_tokens: bearer tokens that may only ``GET``.
    :param anonymous: what a request *without* an ``Authorization`` header
        may do: ``"none"`` (the default: 401), ``"read-only"`` or
        ``"read-write"`` (an open API: only for a trusted network).  With no
        token configured, ``"none"`` is refused as a configuration error,
        since nobody could use the API.  A request presenting a wrong token
        is always refused (401), whatever this says.
    :param max_body_size: largest request body accepted, in bytes (413
        beyond it; the excess is read and discarded, never buffered).
    :param idle_timeout: seconds an idle HTTP connection is kept open.
    :param max_wait: longest ``GET /tasks/{id}?wait=SECONDS`` accepted
        (a request holds its connection while it waits).
    :param max_connections: open HTTP connections at most; a connection
        beyond is closed at once, so that a flood cannot take the
        process's file descriptors.
    :param max_streams: open console event streams at most (503 beyond).
    """

    read_write_tokens: Tuple[str, ...] = attrs.field(default=(), converter=_tokens)
    read_only_tokens: Tuple[str, ...] = attrs.field(default=(), converter=_tokens)
    anonymous: str = attrs.field(default=NONE)
    max_body_size: int = attrs.field(default=DEFAULT_MAX_BODY_SIZE, validator=_positive)
    idle_timeout: float = attrs.field(default=60.0, validator=_positive)
    max_wait: float = attrs.field(default=60.0, validator=_positive)
    max_connections: int = attrs.field(default=256, validator=_positive)
    max_streams: int = attrs.field(default=32, validator=_positive)

    @anonymous.validator
    def _check_anonymous(self, attribute: attrs.Attribute, value: str) -> None:
        if value not in ACCESS_LEVELS:
            raise ConfigurationError(
                f"anonymous must be one of {', '.join(ACCESS_LEVELS)}, not {value!r}"
            )

    def __attrs_post_init__(self) -> None:
        if not self.read_write_tokens and not self.read_only_tokens and self.anonymous == NONE:
            raise ConfigurationError(
                "the HTTP API has no token configured: give at least one token, or set "
                "anonymous to 'read-only' or 'read-write' to run it without authentication"
            )
        both = set(self.read_write_tokens) & set(self.read_only_tokens)
        if both:
            raise ConfigurationError("a token cannot be both read-only and read-write")

    @property
    def open(self) -> bool:
        """Whether anyone who can reach the port may write (no authentication)."""
        return self.anonymous == READ_WRITE

    def __repr__(self) -> str:
        # Never show the tokens themselves (logs, tracebacks).
        return (
            f"ApiConfig(read_write_tokens=<{len(self.read_write_tokens)}>, "
            f"read_only_tokens=<{len(self.read_only_tokens)}>, anonymous={self.anonymous!r}, "
            f"max_body_size={self.max_body_size!r}, idle_timeout={self.idle_timeout!r}, "
            f"max_wait={self.max_wait!r})"
        )
