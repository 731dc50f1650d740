# -*- test-case-name: tests.test_dispatch_credentials -*-
"""
Service credentials: the worker's own tokens, added to URL tasks' requests.

A URL task often calls back into the application that published it (a
Guillotina site, say), which wants to know the caller is allowed in.  The
caller's own ``Authorization`` header must not be copied into the task:
the task travels through RabbitMQ and its record lives in Redis, and no
credential may be kept in either.  Instead the *worker* holds a service
token per target and adds it to the request at the last moment, when the
task's URL falls under a configured prefix::

    "dispatch": {"credentials": [
        {"url_prefix": "http://127.0.0.1:8080/db/",
         "header": "Authorization", "scheme": "Bearer",
         "token_env": "GUILLOTINA_SERVICE_TOKEN"}
    ]}

Rules, and why:

- **The token comes from the environment or a file**, read once when the
  worker starts (:meth:`CredentialRule.load`); a missing or empty source
  stops the worker with a sentence naming the variable or file, never the
  value.  A literal token in the config file is refused: config files are
  committed, copied into images and pasted into tickets.
- **Matching is on the checked URL** (:class:`~quebert.dispatch.policy.Target`,
  the form the request is sent to): same scheme, same host (lower case,
  IDNA), same port (default ports filled in), and a path under the
  prefix's path *on a segment boundary* (``/db/`` matches ``/db/x`` but
  ``/db`` never matches ``/dbx``).  A path with a dot segment (``/db/../x``,
  also percent-encoded, after a backslash or before ``;``) never matches:
  the server would resolve it outside the prefix.  A URL with
  ``user:password@`` never matches (the dispatcher refuses it anyway).
  The longest matching prefix wins.
- **The worker's header wins**: a matching rule replaces any header of the
  same name the task set, and the task's own ``Authorization`` is dropped
  too, so a task can neither choose nor see the credential.
- **Clear text is flagged**: a rule whose prefix is ``http://`` to a host
  other than this machine (``localhost``, a loopback address) is loaded,
  with a warning that its token crosses the network unencrypted: a
  sidecar or a private network may make that acceptable; use ``https://``
  otherwise.
- **The token is scrubbed** (:meth:`ServiceCredentials.redact`) from
  everything the dispatcher records or logs about an answer (body prefix,
  kept headers, error messages), in case a target echoes it back.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.parse
from typing import Any, Iterable, Mapping, Optional

import attrs
from twisted.logger import Logger

from quebert.dispatch.policy import (
    _HEADER_NAME,
    DROPPED_HEADERS,
    RESERVED_PREFIX,
    Target,
    URLPolicy,
)
from quebert.errors import ConfigurationError, URLRefused

#: The keys of one entry of ``dispatch.credentials``.
CONFIG_KEYS = ("url_prefix", "header", "scheme", "token_env", "token_file")
#: What a token is replaced with wherever it shows up in recorded text.
REDACTED = "[redacted]"
#: Shorter tokens are refused: guessable, and scrubbing them would mangle text.
MIN_TOKEN_LENGTH = 8
#: A recorded text ending in at least this many first characters of a token
#: (a body prefix cut inside an echoed token) has that fragment redacted too.
MIN_FRAGMENT = 4

log = Logger(namespace="quebert.dispatch")

# Canonical form only: the real policy still judges every task's URL.
_PARSER = URLPolicy(deny_hosts=(), deny_networks=())
_AUTH_SCHEME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TOKEN_BAD = re.compile(r"[^\x20-\x7e]")
_SEPARATORS = re.compile(r"[/\\]")


def _has_dot_segment(path: str) -> bool:
    """
    ``.`` or ``..`` among the path's segments, percent-encoded or not, with
    ``\\`` as a separator too and ``;parameters`` ignored (``..;/`` is
    ``../`` to some servers).
    """
    decoded = urllib.parse.unquote(path)
    return any(segment.split(";", 1)[0] in (".", "..")
               for segment in _SEPARATORS.split(decoded))


def _under(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or below it, on a segment boundary."""
    if path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


@attrs.frozen
class CredentialRule:
    """
    One entry of ``dispatch.credentials``, validated, its token not read
    yet (:meth:`load` reads it).  ``url_prefix`` is the canonical prefix
    (host in IDNA lower case, default port dropped), taken apart into
    ``scheme``, ``host``, ``port`` and ``path``.  ``auth_scheme`` goes
    before the token in the header value (``""``: the raw token).
    Exactly one of ``token_env`` and ``token_file`` is set.
    """

    url_prefix: str
    scheme: str
    host: str
    port: int
    path: str
    header: str = "Authorization"
    auth_scheme: str = "Bearer"
    token_env: Optional[str] = None
    token_file: Optional[str] = None

    @classmethod
    def from_config(cls, block: Any, where: str = "dispatch.credentials[0]") -> CredentialRule:
        """Read one config entry; a bad one raises ConfigurationError naming ``where``."""
        if not isinstance(block, Mapping):
            raise ConfigurationError(f"{where} must be a JSON object")
        if "token" in block:
            raise ConfigurationError(
                f"{where}.token: a token written in the config file is not accepted (config "
                "files get committed, copied and shown); give token_env (an environment "
                "variable's name) or token_file (a file's path) instead")
        unknown = set(block) - set(CONFIG_KEYS)
        if unknown:
            raise ConfigurationError(f"unknown setting(s) in {where}: "
                                     f"{', '.join(sorted(unknown))} "
                                     f"(known: {', '.join(CONFIG_KEYS)})")
        prefix = block.get("url_prefix")
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"{where}.url_prefix must be an absolute http or https "
                                     f"URL, not {prefix!r}")
        target = _parse_prefix(prefix, f"{where}.url_prefix")
        header = block.get("header", "Authorization")
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
            raise ConfigurationError(f"{where}.header must be an HTTP header name, "
                                     f"not {header!r}")
        lower = header.lower()
        if lower in DROPPED_HEADERS or lower.startswith(RESERVED_PREFIX):
            raise ConfigurationError(f"{where}.header: {header!r} is computed by the worker "
                                     "or reserved, it cannot carry a credential")
        auth_scheme = block.get("scheme", "Bearer")
        if not isinstance(auth_scheme, str) or not _AUTH_SCHEME.fullmatch(auth_scheme):
            raise ConfigurationError(f"{where}.scheme must be one word such as 'Bearer' or "
                                     f"'Basic', or '' for the raw token, not {auth_scheme!r}")
        sources = [key for key in ("token_env", "token_file") if key in block]
        if len(sources) != 1:
            raise ConfigurationError(f"{where} needs exactly one of token_env and token_file")
        source = sources[0]
        value = block[source]
        if source == "token_env" and (not isinstance(value, str)
                                      or not _ENV_NAME.fullmatch(value)):
            raise ConfigurationError(f"{where}.token_env must be an environment variable's "
                                     f"name, not {value!r}")
        if source == "token_file" and (not isinstance(value, str) or not value
                                       or "\x00" in value):
            raise ConfigurationError(f"{where}.token_file must be a file's path, not {value!r}")
        return cls(url_prefix=target.url, scheme=target.scheme, host=target.host,
                   port=target.port, path=target.path, header=header,
                   auth_scheme=auth_scheme, **{source: value})

    @property
    def in_clear(self) -> bool:
        """Whether the token would cross the network unencrypted (``http://``, not loopback)."""
        if self.scheme != "http":
            return False
        host = self.host.strip("[]").rstrip(".")
        if host == "localhost" or host.endswith(".localhost"):
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    @property
    def source(self) -> str:
        """Where the token comes from, for messages (never the token)."""
        if self.token_env is not None:
            return f"the environment variable {self.token_env}"
        return f"the file {self.token_file!r}"

    def matches(self, target: Target) -> bool:
        """Whether a checked URL falls under this rule's prefix (module docstring)."""
        return (target.scheme == self.scheme and target.host == self.host
                and target.port == self.port and _under(target.path, self.path)
                and not _has_dot_segment(target.path))

    def load(self, environ: Optional[Mapping[str, str]] = None) -> ServiceCredential:
        """
        Read the token (``environ`` defaults to ``os.environ``), stripped of
        surrounding white space.  A missing, empty or unreadable source, or
        a token shorter than :data:`MIN_TOKEN_LENGTH` or with control or
        non-ASCII characters, raises
        ConfigurationError naming the source and never the value.
        """
        what = f"dispatch.credentials: the token for {self.url_prefix!r} comes from " \
               f"{self.source}"
        if self.token_env is not None:
            env = os.environ if environ is None else environ
            raw = env.get(self.token_env) or ""
            if not raw.strip():
                raise ConfigurationError(f"{what}, which is not set or empty; set it to the "
                                         "service token before starting the worker")
        else:
            assert self.token_file is not None
            try:
                with open(self.token_file, encoding="utf-8") as f:
                    raw = f.read()
            except OSError as e:
                raise ConfigurationError(f"{what}, which cannot be read: {e.strerror}")
            except UnicodeDecodeError:
                raise ConfigurationError(f"{what}, which is not UTF-8 text")
            if not raw.strip():
                raise ConfigurationError(f"{what}, which is empty")
        token = raw.strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(f"{what}, whose value is shorter than "
                                     f"{MIN_TOKEN_LENGTH} characters: not a service token")
        if _TOKEN_BAD.search(token):
            raise ConfigurationError(f"{what}, whose value has control, non-ASCII or line "
                                     "break characters inside it (not shown)")
        value = f"{self.auth_scheme} {token}" if self.auth_scheme else token
        return ServiceCredential(rule=self, value=value, token=token)


def _parse_prefix(prefix: str, what: str) -> Target:
    try:
        parts = urllib.parse.urlsplit(prefix)
    except ValueError as e:
        raise ConfigurationError(f"{what}: {prefix!r} is not a URL ({e})")
    if parts.query or parts.fragment or prefix.endswith(("?", "#")):
        raise ConfigurationError(f"{what}: {prefix!r} must not have a query string or a "
                                 "fragment (a prefix is matched on the path)")
    try:
        target = _PARSER.parse_url(prefix)
    except URLRefused as e:
        raise ConfigurationError(f"{what} must be an absolute http or https URL: {e}")
    if _has_dot_segment(target.path):
        raise ConfigurationError(f"{what}: {prefix!r} must not have '.' or '..' segments")
    return target


@attrs.frozen
class ServiceCredential:
    """A rule with its token read.  Its repr shows the rule, never the token."""

    rule: CredentialRule
    value: str = attrs.field(repr=False)
    token: str = attrs.field(repr=False)

    @property
    def header(self) -> str:
        """The header the value is sent in."""
        return self.rule.header


@attrs.frozen
class ServiceCredentials:
    """
    The worker's loaded credentials, longest prefix first.

    :meth:`for_target` picks the one a request gets; :meth:`redact` scrubs
    every token from text the dispatcher is about to record or log.
    """

    credentials: tuple = attrs.field(
        default=(), converter=lambda cs: tuple(sorted(
            cs, key=lambda c: (-len(c.rule.path), c.rule.url_prefix))))

    @classmethod
    def load(cls, rules: Iterable[CredentialRule],
             environ: Optional[Mapping[str, str]] = None) -> ServiceCredentials:
        """Read every rule's token (see :meth:`CredentialRule.load`)."""
        rules = tuple(rules)
        loaded = cls(tuple(rule.load(environ) for rule in rules))
        for rule in rules:
            if rule.in_clear:
                log.warn("dispatch.credentials: the token for {url_prefix} is sent over "
                         "plain http:// to {host}, not this machine: anyone on the network "
                         "path can read it; use https:// unless that path is private",
                         url_prefix=rule.url_prefix, host=rule.host)
        return loaded

    def __bool__(self) -> bool:
        return bool(self.credentials)

    def for_target(self, target: Target) -> Optional[ServiceCredential]:
        """The credential of the longest prefix ``target`` falls under, if any."""
        for credential in self.credentials:
            if credential.rule.matches(target):
                return credential
        return None

    def for_url(self, url: str) -> Optional[ServiceCredential]:
        """:meth:`for_target` for a raw URL; ``None`` for a URL that is not valid
        (``user:password@`` included)."""
        try:
            target = _PARSER.parse_url(url)
        except URLRefused:
            return None
        return self.for_target(target)

    def redact(self, text: str) -> str:
        """
        ``text`` with every token replaced by :data:`REDACTED`, and a trailing
        fragment of a token (:data:`MIN_FRAGMENT` characters or more, as when
        a body prefix is cut inside an echoed token) too.
        """
        if not self.credentials or not text:
            return text
        for credential in self.credentials:
            token = credential.token
            text = text.replace(token, REDACTED)
            for size in range(min(len(token) - 1, len(text)), MIN_FRAGMENT - 1, -1):
                if text.endswith(token[:size]):
                    text = text[:-size] + REDACTED
                    break
        return text


#: No credentials: what a dispatcher built without any uses.
NO_CREDENTIALS = ServiceCredentials()
