"""
Tests for quebert.dispatch.policy (URLPolicy) and quebert.dispatch.settings
(the config file's ``dispatch`` block): no network involved.
"""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from quebert.dispatch import (
    DEFAULT_DISPATCH_DEADLINE,
    DispatchSettings,
    QueueLimits,
    URLDispatcher,
    URLPolicy,
    URLRequest,
)
from quebert.errors import ConfigurationError, Reject, URLRefused


class CheckURLTests(SynchronousTestCase):
    def setUp(self):
        self.policy = URLPolicy()

    def refused(self, url, reason, policy=None):
        with self.assertRaises(URLRefused) as caught:
            (policy or self.policy).check_url(url)
        self.assertIn(reason, str(caught.exception))
        self.assertIsInstance(caught.exception, Reject)
        return caught.exception

    def test_allowed(self):
        for url in ("http://example.com", "https://example.com:8443/a/b?c=d",
                    "http://127.0.0.1:8080/", "http://10.1.2.3/", "http://[::1]/",
                    "http://my_service:8000/hook", "HTTPS://Example.COM/"):
            self.policy.check_url(url)

    def test_parts(self):
        target = self.policy.parse_url("HTTPS://Bücher.Example./ä b?q=ü#frag".replace(" ", "%20"))
        self.assertEqual(target.host, "xn--bcher-kva.example")
        self.assertEqual(target.port, 443)
        self.assertEqual(target.url, "https://xn--bcher-kva.example/%C3%A4%20b?q=%C3%BC")
        self.assertIsNone(target.address)
        self.assertEqual(self.policy.parse_url("http://[::1]:81/").origin, "http://[::1]:81")

    def test_syntax(self):
        self.refused(b"http://example.com/", "a URL must be a string")
        self.refused("/relative/path", "not an absolute URL")
        self.refused("http://exa mple.com/", "spaces or control characters")
        self.refused("http://example.com/\r\nHost: evil", "spaces or control characters")
        self.refused("http://", "no host")
        self.refused("http://:80/", "no host")
        self.refused("http://example.com:0/", "port 0 is out of range")
        self.refused("http://example.com:70000/", "bad host or port")
        self.refused("http://example.com:http/", "bad host or port")
        self.refused("http://[::1/", "not a valid URL")
        self.refused("http://[nope]/", "not a valid URL")
        self.refused("http://ex!ample.com/", "not a valid host name")
        self.refused("http://" + "a" * 64 + ".com/", "not a valid host name")
        self.refused("http://example.com/" + "a" * 9000, "longer than 8192")

    def test_scheme(self):
        self.refused("ftp://example.com/", "scheme 'ftp' is not allowed")
        self.refused("file:///etc/passwd", "scheme 'file' is not allowed")
        self.refused("gopher://127.0.0.1:6379/_FLUSHALL", "scheme 'gopher'")
        https_only = URLPolicy(allowed_schemes=["HTTPS"])
        https_only.check_url("https://example.com/")
        self.refused("http://example.com/", "allowed: https", https_only)

    def test_credentials_refused(self):
        self.refused("http://user:pw@example.com/", "credentials in the URL")
        self.refused("http://example.com@169.254.169.254/", "credentials in the URL")

    def test_odd_ipv4_spellings_refused(self):
        for host in ("2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518",
                     "0xa9.254.169.254", "127.1", "example.123"):
            self.refused(f"http://{host}/", "not a canonical IPv4 address")

    def test_metadata_addresses_refused(self):
        for url in ("http://169.254.169.254/latest/meta-data/",
                    "http://169.254.170.2/v2/credentials",
                    "http://100.100.100.200/latest/meta-data/",
                    "http://[fd00:ec2::254]/latest/meta-data/",
                    "http://[::ffff:169.254.169.254]/",
                    "http://[::ffff:a9fe:a9fe]/",
                    "http://[64:ff9b::a9fe:a9fe]/",
                    "http://[fe80::1]/",
                    "http://0.0.0.0:8080/",
                    "http://224.0.0.1/",
                    "http://255.255.255.255/"):
            self.refused(url, "in the denied network")

    def test_metadata_names_refused(self):
        self.refused("http://metadata.google.internal/computeMetadata/v1/", "deny_hosts")
        self.refused("http://METADATA.GOOGLE.INTERNAL./", "deny_hosts")

    def test_zone_id_refused(self):
        self.refused("http://[fe80::1%25eth0]/", "zone identifiers")

    def test_host_patterns(self):
        policy = URLPolicy(allow_hosts=["*.example.com", "api.partner.test", "10.0.0.5"],
                           deny_hosts=["internal.example.com"])
        for url in ("https://a.example.com/", "https://a.b.example.com/",
                    "https://API.partner.test/", "http://10.0.0.5/"):
            policy.check_url(url)
        self.refused("https://example.com/", "not in allow_hosts", policy)
        self.refused("https://evilexample.com/", "not in allow_hosts", policy)
        self.refused("https://partner.test/", "not in allow_hosts", policy)
        self.refused("https://internal.example.com/", "is denied", policy)
        # Denying hosts replaces the default list in the constructor...
        URLPolicy(deny_hosts=["x.test"]).check_url("http://metadata.goog/")
        # ...but adds to it from a config file.
        self.refused("http://metadata.goog/", "is denied",
                     URLPolicy.from_config({"deny_hosts": ["x.test"]}))

    def test_loopback_and_private_allowed_by_default(self):
        for address in ("127.0.0.1", "::1", "10.0.0.1", "172.16.5.4", "192.168.1.1",
                        "100.64.0.1", "fd12::1"):
            self.policy.check_address(address)

    def test_named_network_sets(self):
        policy = URLPolicy(deny_networks=["default", "loopback", "private"])
        for address in ("127.0.0.1", "::1", "10.0.0.1", "fd12::1", "169.254.169.254"):
            self.assertRaises(URLRefused, policy.check_address, address)
        policy.check_address("93.184.216.34")


class NetworkRuleTests(SynchronousTestCase):
    def test_longest_prefix_wins(self):
        policy = URLPolicy(allow_networks=["169.254.10.0/24"],
                           deny_networks=["169.254.0.0/16", "169.254.10.7/32"])
        policy.check_address("169.254.10.1")
        self.assertRaises(URLRefused, policy.check_address, "169.254.10.7")
        self.assertRaises(URLRefused, policy.check_address, "169.254.11.1")

    def test_tie_goes_to_deny(self):
        policy = URLPolicy(allow_networks=["10.0.0.0/8"], deny_networks=["10.0.0.0/8"])
        self.assertRaises(URLRefused, policy.check_address, "10.1.1.1")

    def test_allow_list(self):
        policy = URLPolicy(deny_networks=["0.0.0.0/0", "::/0"], allow_networks=["10.1.0.0/16"])
        policy.check_address("10.1.2.3")
        for address in ("10.2.0.1", "8.8.8.8", "::1", "2001:db8::1"):
            self.assertRaises(URLRefused, policy.check_address, address)

    def test_mapped_ipv4_judged_as_ipv4(self):
        policy = URLPolicy(deny_networks=["10.0.0.0/8"])
        self.assertRaises(URLRefused, policy.check_address, "::ffff:10.0.0.1")
        self.assertRaises(URLRefused, policy.check_address, "64:ff9b::10.0.0.1")
        self.assertRaises(URLRefused, policy.check_address, "2002:0a00:0001::1")

    def test_message_names_host_and_address(self):
        with self.assertRaises(URLRefused) as caught:
            URLPolicy().check_address("169.254.169.254", host="evil.test")
        self.assertEqual(str(caught.exception), "host evil.test (169.254.169.254) refused: "
                                                "address 169.254.169.254 is in the denied "
                                                "network 169.254.0.0/16")

    def test_scope_id_ignored(self):
        self.assertRaises(URLRefused, URLPolicy().check_address, "fe80::1%eth0")

    def test_not_an_address(self):
        self.assertRaises(URLRefused, URLPolicy().check_address, "example.com")


class RequestCheckTests(SynchronousTestCase):
    def test_method_upper_cased_and_checked(self):
        self.assertEqual(URLRequest("http://x.test/", method="patch").method, "PATCH")
        for method in ("CONNECT", "TRACE", "FOO"):
            self.assertRaises(URLRefused, URLPolicy().check_request,
                              URLRequest("http://x.test/", method=method))

    def test_body_size(self):
        policy = URLPolicy(max_request_size=3)
        policy.check_request(URLRequest("http://x.test/", body=b"abc"))
        self.assertRaises(URLRefused, policy.check_request,
                          URLRequest("http://x.test/", body="abcd"))

    def test_headers(self):
        policy = URLPolicy()
        policy.check_request(URLRequest("http://x.test/", headers={"X-A": "b c"}))
        for headers in ({"X A": "b"}, {"X-A": "b\nc"}, {"X-A": "b\x00"}, {"": "b"},
                        {"X-A": 1}, {"X-A\n": "b"}, {"X-A\r\n": "b"}):
            self.assertRaises(URLRefused, policy.check_request,
                              URLRequest("http://x.test/", headers=headers))


class PolicyPropertyTests(SynchronousTestCase):
    @settings(max_examples=1000)
    @given(st.text(max_size=120))
    def test_any_text_is_checked_or_refused(self, url):
        try:
            URLPolicy().check_url(url)
        except URLRefused:
            pass

    @settings(max_examples=1000)
    @given(st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "//", ""]),
           st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
           st.sampled_from(["", "/", "/p?q", ":80/", ":", "#f"]))
    def test_url_shaped_text(self, scheme, middle, tail):
        policy = URLPolicy(allow_hosts=["*.example.com"])
        try:
            target = policy.parse_url(scheme + middle + tail)
        except URLRefused:
            return
        # Whatever got through re-checks cleanly and to the same place.
        again = policy.parse_url(target.url)
        self.assertEqual((again.host, again.port, again.url),
                         (target.host, target.port, target.url))

    @settings(max_examples=500)
    @given(st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
    def test_any_address(self, ip):
        policy = URLPolicy(deny_networks=["default", "private"])
        try:
            policy.check_address(str(ip))
        except URLRefused:
            self.assertFalse(ip.is_global and not ip.is_multicast
                             and ip not in ipaddress.ip_network("100.100.100.200/32")
                             and ip not in ipaddress.ip_network("168.63.129.16/32")
                             and (ip.version == 4 or ip.ipv4_mapped is None)
                             and (ip.version == 4 or ip.sixtofour is None)
                             and (ip.version == 4 or ip not in
                                  ipaddress.ip_network("64:ff9b::/96")), ip)


class FromConfigTests(SynchronousTestCase):
    def test_empty(self):
        self.assertEqual(URLPolicy.from_config({}), URLPolicy())
        self.assertEqual(DispatchSettings.from_config({}), DispatchSettings())

    def test_every_key(self):
        config = {
            "allow_schemes": ["https"],
            "allow_hosts": ["*.example.com"],
            "deny_hosts": ["bad.example.com"],
            "allow_networks": ["169.254.7.0/24"],
            "deny_networks": ["private"],
            "max_request_size": 2048,
            "max_response_size": 4096.0,
            "max_connections": 20,
            "max_connections_per_host": 4,
            "connect_timeout": 2.5,
            "dispatch_deadline": 60,
            "max_concurrent_dispatches": 10,
            "max_dispatches_per_second": 5,
            "queues": {"emails": {"max_concurrent_dispatches": 2, "max_burst_size": 1}},
        }
        s = DispatchSettings.from_config(config)
        self.assertEqual(s.policy.allowed_schemes, frozenset({"https"}))
        self.assertEqual(s.policy.allow_hosts, ("*.example.com",))
        self.assertIn("bad.example.com", s.policy.deny_hosts)
        self.assertIn("metadata.google.internal", s.policy.deny_hosts)
        self.assertIn(ipaddress.ip_network("10.0.0.0/8"), s.policy.deny_networks)
        self.assertIn(ipaddress.ip_network("169.254.0.0/16"), s.policy.deny_networks)
        s.policy.check_address("169.254.7.1")
        self.assertEqual((s.policy.max_request_size, s.policy.max_response_size), (2048, 4096))
        self.assertEqual((s.max_connections, s.max_connections_per_host, s.connect_timeout,
                          s.dispatch_deadline), (20, 4, 2.5, 60.0))
        self.assertEqual(s.default_limits, QueueLimits(10, 5))
        self.assertEqual(s.limits, {"emails": QueueLimits(2, 5, 1)})
        dispatcher = s.dispatcher(object(), agent=object())
        self.assertIsInstance(dispatcher, URLDispatcher)
        self.assertEqual(dispatcher.max_connections, 20)
        self.assertEqual(DEFAULT_DISPATCH_DEADLINE, 600)

    def test_the_worker_and_the_mediator_default_to_one_deadline(self):
        """
        A URL task no message, queue or configuration gives a deadline gets
        the dispatcher's default from the mediator too: the value is defined
        once (it was two constants that could drift apart).
        """
        from quebert import _url_task
        self.assertIs(_url_task.DEFAULT_DISPATCH_DEADLINE, DEFAULT_DISPATCH_DEADLINE)
        self.assertEqual(DispatchSettings().dispatch_deadline, DEFAULT_DISPATCH_DEADLINE)

    def test_queue_rate_without_burst_gets_its_own_burst(self):
        s = DispatchSettings.from_config({"max_dispatches_per_second": 100,
                                          "max_burst_size": 100,
                                          "queues": {"q": {"max_dispatches_per_second": 5}}})
        self.assertEqual(s.limits["q"].burst, 5)

    def test_example_in_the_docs(self):
        import json
        import os
        import re

        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "url-tasks.rst")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        block = re.search(r"code-block:: json\n\n((?:    .*\n|\n)+)", text).group(1)
        s = DispatchSettings.from_config(json.loads(block)["dispatch"])
        self.assertEqual(s.limits["emails"], QueueLimits(2, 5))
        self.assertEqual(s.default_limits, QueueLimits(50, 100, 100))

    def test_errors_name_the_key(self):
        for config, words in (
            ({"allow_hosts": "example.com"}, "dispatch.allow_hosts must be a list"),
            ({"allow_hosts": ["exa mple"]}, "allow_hosts: 'exa mple' is not a host"),
            ({"allow_hosts": ["a.*.com"]}, "is not a host name pattern"),
            ({"deny_networks": ["10.0.0.1/8"]}, "deny_networks: '10.0.0.1/8' is not a net"),
            ({"allow_networks": ["private-ish"]}, "allow_networks: 'private-ish'"),
            ({"allow_schemes": ["gopher"]}, "allow_schemes: 'gopher'"),
            ({"allow_schemes": []}, "at least one scheme"),
            ({"max_request_size": -1}, "max_request_size must be an integer >= 0"),
            ({"max_response_size": "1MB"}, "max_response_size must be an integer"),
            ({"max_connections": 0}, "dispatch.max_connections must be an integer > 0"),
            ({"dispatch_deadline": "10"}, "dispatch.dispatch_deadline must be a number"),
            ({"max_dispatches_per_second": 0}, "max_dispatches_per_second must be > 0"),
            ({"queues": []}, "dispatch.queues must be an object"),
            ({"queues": {"q": 5}}, "dispatch.queues.q must be a JSON object"),
            ({"queues": {"q": {"max_burst_size": 0}}}, "dispatch.queues.q: max_burst_size"),
            ({"queues": {"q": {"timeout": 5}}}, "unknown setting(s) in dispatch.queues.q"),
            ({"allow_host": ["x"]}, "unknown dispatch setting(s): allow_host"),
            ([], "'dispatch' must be a JSON object"),
        ):
            with self.assertRaises(ConfigurationError, msg=config) as caught:
                DispatchSettings.from_config(config)
            self.assertIn(words, str(caught.exception))
