# -*- test-case-name: tests.test_dispatch_policy -*-
"""
Guardrails of URL tasks: which URLs a worker agrees to request.

A URL task makes the worker send an HTTP request from inside your network,
to a URL chosen by whoever published the task.  :class:`URLPolicy` decides,
before any byte is sent, whether that is acceptable:

1. :meth:`URLPolicy.check_url` reads the URL alone, without touching the
   network: syntax, scheme, credentials in the URL, host name patterns,
   and the address itself when the host is an IP literal.
2. :meth:`URLPolicy.check_address` is applied, at connect time, to *every*
   address the host name resolves to (see :mod:`quebert.dispatch.connect`),
   and the connection is then made to a checked address, so a DNS answer
   that changes between the check and the connection cannot slip through.

Networks are matched longest prefix first: the most specific of the
``allow_networks`` and ``deny_networks`` entries containing an address
decides, a tie goes to deny, and an address that no entry contains is
allowed.  So ``allow_networks=("169.254.10.0/24",)`` opens a hole in the
default link-local deny, and ``deny_networks=("0.0.0.0/0", "::/0")`` with
``allow_networks=("10.1.0.0/16",)`` turns the policy into an allow-list.

Default decisions, and why:

- **Loopback and private ranges are allowed.**  URL tasks usually call the
  application's own services (an App Engine push queue calls the app
  itself), which live on localhost or a private network.  When task URLs
  come from untrusted input, deny them: the config names ``"loopback"``
  and ``"private"`` stand for :data:`LOOPBACK_NETWORKS` and
  :data:`PRIVATE_NETWORKS`.
- **Link-local, cloud metadata endpoints, "this network", multicast and
  reserved ranges are denied** (:data:`DEFAULT_DENY_NETWORKS`): a metadata
  endpoint hands out the machine's cloud credentials to anyone who can make
  it send a GET, and nothing legitimate is served from the others.  The
  metadata host names are denied by name too (:data:`DEFAULT_DENY_HOSTS`).
- **Credentials in the URL are refused**: they would end up in logs and in
  the task's state; send an ``Authorization`` header instead.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Any, Iterable, Mapping, Optional, Union

import attrs
import idna

from quebert.errors import ConfigurationError, URLRefused

#: Denied unless an ``allow_networks`` entry at least as specific allows it.
DEFAULT_DENY_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8",           # "this network"; connecting to 0.0.0.0 reaches the local host
    "169.254.0.0/16",      # IPv4 link-local: 169.254.169.254 is the AWS, GCP, Azure,
                           # OpenStack and Oracle metadata service, 169.254.170.2 ECS's
    "100.100.100.200/32",  # Alibaba Cloud metadata service
    "168.63.129.16/32",    # Azure WireServer (host agent, not a service of yours)
    "224.0.0.0/4",         # IPv4 multicast
    "240.0.0.0/4",         # reserved, and the broadcast address
    "::/128",              # unspecified address
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS metadata service over IPv6
    "ff00::/8",            # IPv6 multicast
)

#: Cloud metadata host names, denied by name whatever they resolve to.
DEFAULT_DENY_HOSTS: tuple[str, ...] = ("metadata.google.internal", "metadata.goog")

#: Allowed by default; the config name ``"loopback"`` stands for these.
LOOPBACK_NETWORKS: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

#: Allowed by default; the config name ``"private"`` stands for these.
PRIVATE_NETWORKS: tuple[str, ...] = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
    "100.64.0.0/10",                                   # carrier-grade NAT
    "fc00::/7",                                        # IPv6 unique local
)

_NETWORK_NAMES = {
    "default": DEFAULT_DENY_NETWORKS,
    "loopback": LOOPBACK_NETWORKS,
    "private": PRIVATE_NETWORKS,
}

#: Header prefix reserved for quebert: a task's own ``X-Quebert-*`` headers are dropped.
RESERVED_PREFIX = "x-quebert-"
#: Request headers a task may not set: computed by the HTTP client, or hop-by-hop.
DROPPED_HEADERS = frozenset({
    "host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
    "trailer", "upgrade", "proxy-connection", "proxy-authorization",
})

#: Methods a URL task may use (those of Cloud Tasks' HTTP targets).
ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

MAX_URL_LENGTH = 8192
MiB = 1024 * 1024

_Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_PATTERN = re.compile(r"^(\*\.)?[a-z0-9_.:-]+$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_HEADER_VALUE_BAD = re.compile(r"[\x00\r\n]")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"


@attrs.frozen
class Target:
    """
    A URL that passed :meth:`URLPolicy.check_url`, taken apart.

    ``url`` is rebuilt from the checked parts (host IDNA-encoded, path and
    query percent-encoded, fragment and trailing dot dropped), so the
    request goes exactly where the checks looked.  ``address`` is set when
    the host is an IP literal; ``path`` is the path as sent (percent-encoded,
    at least ``/``), what service credentials match their prefixes against.
    """

    url: str
    scheme: str
    host: str
    port: int
    address: Optional[str] = None
    path: str = "/"

    @property
    def origin(self) -> str:
        """``scheme://host:port``, what logs show instead of the full URL."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def _refuse(url: Any, reason: str) -> URLRefused:
    shown = url if isinstance(url, str) else repr(url)
    if isinstance(url, str) and "?" in shown:
        shown = shown.split("?", 1)[0] + "?..."  # a query string may hold secrets
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return URLRefused(f"URL {shown!r} refused: {reason}")


def _network(value: Any, what: str) -> _Network:
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(f"{what}: {value!r} is not a network (CIDR string)")
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as e:
        raise ConfigurationError(f"{what}: {value!r} is not a network: {e}")


def _networks(what: str):
    def convert(values: Iterable[Any]) -> tuple[_Network, ...]:
        if isinstance(values, (str, bytes)):
            values = [values]
        result: list[_Network] = []
        for value in values:
            if isinstance(value, str) and value.strip().lower() in _NETWORK_NAMES:
                result.extend(_network(v, what) for v in _NETWORK_NAMES[value.strip().lower()])
            else:
                result.append(_network(value, what))
        return tuple(dict.fromkeys(result))

    return convert


def _host_patterns(what: str):
    def convert(values: Iterable[Any]) -> tuple[str, ...]:
        if isinstance(values, (str, bytes)):
            values = [values]
        result = []
        for value in values:
            if not isinstance(value, str):
                raise ConfigurationError(f"{what}: {value!r} is not a host name pattern")
            pattern = value.strip().lower().rstrip(".")
            if pattern.startswith("[") and pattern.endswith("]"):
                pattern = pattern[1:-1]
            if not _PATTERN.fullmatch(pattern) or "*" in pattern[1:]:
                raise ConfigurationError(
                    f"{what}: {value!r} is not a host name pattern "
                    "(a host name, an IP address, or '*.' followed by a domain)")
            result.append(pattern)
        return tuple(dict.fromkeys(result))

    return convert


def _schemes(values: Iterable[Any]) -> frozenset:
    if isinstance(values, (str, bytes)):
        values = [values]
    result = set()
    for value in values:
        if not isinstance(value, str) or value.lower() not in ("http", "https"):
            raise ConfigurationError(
                f"allow_schemes: {value!r} is not a scheme quebert can dispatch "
                "(http, https)")
        result.add(value.lower())
    if not result:
        raise ConfigurationError("allow_schemes must name at least one scheme")
    return frozenset(result)


def _size(what: str):
    def check(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigurationError(f"{what} must be an integer >= 0, not {value!r}")

    return check


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@attrs.frozen
class URLPolicy:
    """
    What URL tasks may request; see the module docstring for the rules.

    Host patterns are a host name or IP address (exact match) or
    ``*.example.com`` (any name under ``example.com``, not the domain
    itself).  A host matching ``deny_hosts`` is refused; when
    ``allow_hosts`` is not empty, a host matching none of them is refused.
    Sizes are in bytes.
    """

    allowed_schemes: frozenset = attrs.field(default=frozenset({"http", "https"}),
                                             converter=_schemes)
    allow_hosts: tuple = attrs.field(default=(), converter=_host_patterns("allow_hosts"))
    deny_hosts: tuple = attrs.field(default=DEFAULT_DENY_HOSTS,
                                    converter=_host_patterns("deny_hosts"))
    allow_networks: tuple = attrs.field(default=(), converter=_networks("allow_networks"))
    deny_networks: tuple = attrs.field(default=DEFAULT_DENY_NETWORKS,
                                       converter=_networks("deny_networks"))
    max_request_size: int = attrs.field(default=MiB, validator=_size("max_request_size"))
    max_response_size: int = attrs.field(default=MiB, validator=_size("max_response_size"))
    _rules: tuple = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        rules = [(n.prefixlen, True, n) for n in self.allow_networks]
        rules += [(n.prefixlen, False, n) for n in self.deny_networks]
        # Most specific first; on a tie deny (False) sorts before allow.
        rules.sort(key=lambda r: (-r[0], r[1]))
        object.__setattr__(self, "_rules", tuple(rules))

    #: The keys of a config ``dispatch`` block that :meth:`from_config` reads.
    CONFIG_KEYS = ("allow_schemes", "allow_hosts", "deny_hosts", "allow_networks",
                   "deny_networks", "max_request_size", "max_response_size")

    @classmethod
    def from_config(cls, mapping: Mapping[str, Any]) -> URLPolicy:
        """
        A policy from the ``dispatch`` block of a JSON config file.

        ``deny_hosts`` and ``deny_networks`` *add to* the defaults (so a
        config cannot drop the metadata guard by accident; ``allow_networks``
        opens holes on purpose).  Network lists may use the names
        ``"loopback"``, ``"private"`` and ``"default"``.  Keys this method
        does not own are ignored (see :data:`CONFIG_KEYS`); bad values raise
        :class:`~quebert.errors.ConfigurationError` naming the key.
        """
        if not isinstance(mapping, Mapping):
            raise ConfigurationError("'dispatch' must be a JSON object")
        kwargs: dict[str, Any] = {}
        for key in ("allow_hosts", "deny_hosts", "allow_networks", "deny_networks",
                    "allow_schemes"):
            if key in mapping:
                value = mapping[key]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigurationError(f"dispatch.{key} must be a list of strings, "
                                             f"not {value!r}")
        if "allow_schemes" in mapping:
            kwargs["allowed_schemes"] = mapping["allow_schemes"]
        if "allow_hosts" in mapping:
            kwargs["allow_hosts"] = mapping["allow_hosts"]
        if "allow_networks" in mapping:
            kwargs["allow_networks"] = mapping["allow_networks"]
        if "deny_hosts" in mapping:
            kwargs["deny_hosts"] = DEFAULT_DENY_HOSTS + tuple(mapping["deny_hosts"])
        if "deny_networks" in mapping:
            kwargs["deny_networks"] = DEFAULT_DENY_NETWORKS + tuple(mapping["deny_networks"])
        for key in ("max_request_size", "max_response_size"):
            if key in mapping:
                value = mapping[key]
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigurationError as e:
            raise ConfigurationError(f"dispatch: {e}")

    # -- checks ---------------------------------------------------------

    def check_url(self, url: Any) -> None:
        """
        Raise :class:`~quebert.errors.URLRefused` saying why if ``url`` may
        not be requested; never touches the network.
        """
        self.parse_url(url)

    def parse_url(self, url: Any) -> Target:
        """:meth:`check_url`, answering the checked parts (a :class:`Target`)."""
        if not isinstance(url, str):
            raise _refuse(url, "a URL must be a string")
        if len(url) > MAX_URL_LENGTH:
            raise _refuse(url, f"longer than {MAX_URL_LENGTH} characters")
        if _CONTROL.search(url):
            raise _refuse(url, "contains spaces or control characters")
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:
            raise _refuse(url, f"not a valid URL ({e})")
        scheme = parts.scheme.lower()
        if not scheme:
            raise _refuse(url, "not an absolute URL (no scheme)")
        if scheme not in self.allowed_schemes:
            raise _refuse(url, f"scheme {scheme!r} is not allowed (allowed: "
                               f"{', '.join(sorted(self.allowed_schemes))})")
        netloc = parts.netloc
        if not netloc:
            raise _refuse(url, "no host")
        if "@" in netloc:
            raise _refuse(url, "credentials in the URL are not allowed "
                               "(send an Authorization header instead)")
        if "\\" in netloc:
            raise _refuse(url, "backslash in the host part")
        bracketed = netloc.startswith("[")
        try:
            raw_host = parts.hostname
            port = parts.port
        except ValueError as e:
            raise _refuse(url, f"bad host or port ({e})")
        if not raw_host:
            raise _refuse(url, "no host")
        if port is None:
            if netloc.endswith(":"):
                raise _refuse(url, "empty port")
            port = 443 if scheme == "https" else 80
        if not 0 < port < 65536:
            raise _refuse(url, f"port {port} is out of range")
        host, address = self._host(url, raw_host, bracketed)
        self._check_host_patterns(url, host)
        if address is not None:
            self._check(address, lambda reason: _refuse(url, reason))
        path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
        query = urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
        shown_host = f"[{host}]" if ":" in host else host
        default_port = 443 if scheme == "https" else 80
        netloc = shown_host if port == default_port else f"{shown_host}:{port}"
        rebuilt = f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
        return Target(url=rebuilt, scheme=scheme, host=host, port=port, address=address,
                      path=path)

    def check_address(self, address: str, host: Optional[str] = None) -> None:
        """
        Raise :class:`~quebert.errors.URLRefused` if ``address`` (an IP
        address, as resolved for ``host``) is in a denied network.
        """
        shown = f"{host} ({address})" if host and host != address else address

        def refuse(reason: str) -> URLRefused:
            return URLRefused(f"host {shown} refused: {reason}")

        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            raise refuse("not an IP address")
        self._check(ip.compressed, refuse)

    def _check(self, address: str, refuse: Any) -> None:
        ip = ipaddress.ip_address(address)
        candidates: list[_Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            # An IPv4 address wrapped in IPv6 reaches the IPv4 host: judge both.
            if ip.ipv4_mapped is not None:
                candidates.append(ip.ipv4_mapped)
            elif ip in _NAT64:
                candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            elif ip.sixtofour is not None:
                candidates.append(ip.sixtofour)
        for candidate in candidates:
            network = self._denied_by(candidate)
            if network is not None:
                raise refuse(f"address {candidate} is in the denied network {network}")

    def _denied_by(self, ip: _Address) -> Optional[_Network]:
        for _, allow, network in self._rules:
            if network.version == ip.version and ip in network:
                return None if allow else network
        return None

    def _host(self, url: str, raw_host: str, bracketed: bool) -> tuple[str, Optional[str]]:
        """The canonical host name, and the address if it is an IP literal."""
        if bracketed:
            if "%" in raw_host:
                raise _refuse(url, "IPv6 zone identifiers are not allowed")
            try:
                ip = ipaddress.IPv6Address(raw_host)
            except ValueError:
                raise _refuse(url, f"{raw_host!r} is not an IPv6 address")
            return ip.compressed, ip.compressed
        host = raw_host.rstrip(".")
        if not host:
            raise _refuse(url, "no host")
        labels = host.split(".")
        if _NUMERIC_LABEL.fullmatch(labels[-1]):
            # Resolvers read "2852039166", "0xa9.254.169.254" or "169.254.43518"
            # as IPv4 addresses; only the canonical dotted quad is accepted.
            try:
                ip4 = ipaddress.IPv4Address(host)
            except ValueError:
                raise _refuse(url, f"{raw_host!r} is not a canonical IPv4 address")
            return ip4.compressed, ip4.compressed
        if host.isascii():
            if not all(_HOST_LABEL.fullmatch(label) for label in labels) or len(host) > 253:
                raise _refuse(url, f"{raw_host!r} is not a valid host name")
            return host, None
        try:
            ascii_host = idna.encode(host, uts46=True).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError, ValueError) as e:
            raise _refuse(url, f"{raw_host!r} is not a valid host name ({e})")
        if not ascii_host or len(ascii_host) > 253 or not all(
                _HOST_LABEL.fullmatch(label) for label in ascii_host.split(".")):
            raise _refuse(url, f"{raw_host!r} is not a valid host name")
        return ascii_host, None

    def _check_host_patterns(self, url: str, host: str) -> None:
        for pattern in self.deny_hosts:
            if _matches(host, pattern):
                raise _refuse(url, f"host {host!r} is denied (deny_hosts {pattern!r})")
        if self.allow_hosts and not any(_matches(host, p) for p in self.allow_hosts):
            raise _refuse(url, f"host {host!r} is not in allow_hosts")

    def check_request(self, request: Any) -> Target:
        """
        Everything about a :class:`~quebert.dispatch.URLRequest` that can be
        checked without the network: its URL, method, headers and body size.
        """
        target = self.parse_url(request.url)
        if request.method not in ALLOWED_METHODS:
            raise URLRefused(f"method {request.method!r} is not allowed for URL tasks "
                             f"(allowed: {', '.join(sorted(ALLOWED_METHODS))})")
        for name, value in request.headers.items():
            if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
                raise URLRefused(f"{name!r} is not a valid HTTP header name")
            if not isinstance(value, str) or _HEADER_VALUE_BAD.search(value):
                raise URLRefused(f"the value of header {name!r} is not valid "
                                 "(a string without CR, LF or NUL)")
        if len(request.body) > self.max_request_size:
            raise URLRefused(f"request body of {len(request.body)} bytes is larger than "
                             f"max_request_size ({self.max_request_size} bytes)")
        return target
