"""
Unit tests of service credentials (quebert.dispatch.credentials): the
config entries, reading the tokens, matching URLs to prefixes, scrubbing,
and the dispatcher adding the header, deterministic with treq's in-memory
agent (``RequestTraversalAgent``, what ``StubTreq`` runs on) and a Clock.
"""

from __future__ import annotations

import json
import os

from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from quebert.dispatch import DispatchSettings, URLDispatcher, URLPolicy, URLRequest
from quebert.dispatch.credentials import (
    REDACTED,
    CredentialRule,
    ServiceCredentials,
)
from quebert.errors import ConfigurationError, DispatchError
from quebert.mediator import error_info

TOKEN = "svc-0123456789abcdef-token"
ENV = {"SVC_TOKEN": TOKEN, "OTHER_TOKEN": "other-0123456789"}


def rule(prefix="http://127.0.0.1:8080/db/", **extra):
    block = {"url_prefix": prefix, "token_env": "SVC_TOKEN", **extra}
    return CredentialRule.from_config(block)


def loaded(*rules):
    return ServiceCredentials.load(rules or (rule(),), ENV)


class RuleConfigTests(SynchronousTestCase):
    def test_defaults(self):
        r = rule()
        self.assertEqual((r.url_prefix, r.scheme, r.host, r.port, r.path),
                         ("http://127.0.0.1:8080/db/", "http", "127.0.0.1", 8080, "/db/"))
        self.assertEqual((r.header, r.auth_scheme, r.token_env, r.token_file),
                         ("Authorization", "Bearer", "SVC_TOKEN", None))

    def test_prefix_is_canonical(self):
        r = rule("HTTPS://Bücher.Example.:443/db")
        self.assertEqual(r.url_prefix, "https://xn--bcher-kva.example/db")
        self.assertEqual((r.host, r.port, r.path), ("xn--bcher-kva.example", 443, "/db"))
        self.assertEqual(rule("http://[::1]:8080").url_prefix, "http://[::1]:8080/")

    def test_errors_name_the_entry_and_key(self):
        for block, words in (
            ([], "dispatch.credentials[0] must be a JSON object"),
            ({"url_prefix": "http://h/", "token": "x"},
             "dispatch.credentials[0].token: a token written in the config file"),
            ({"url_prefix": "http://h/", "token_env": "A", "headers": "X"},
             "unknown setting(s) in dispatch.credentials[0]: headers"),
            ({"token_env": "A"}, "url_prefix must be an absolute http or https URL"),
            ({"url_prefix": "/db/", "token_env": "A"}, "not an absolute URL"),
            ({"url_prefix": "ftp://h/db/", "token_env": "A"}, "scheme 'ftp' is not allowed"),
            ({"url_prefix": "http://u:p@h/db/", "token_env": "A"}, "credentials in the URL"),
            ({"url_prefix": "http://h/db/?a=1", "token_env": "A"}, "query string"),
            ({"url_prefix": "http://h/db/#x", "token_env": "A"}, "fragment"),
            ({"url_prefix": "http://h/db/../x/", "token_env": "A"}, "'..' segments"),
            ({"url_prefix": "http://h/db/%2E/", "token_env": "A"}, "'..' segments"),
            ({"url_prefix": "http://h/", "token_env": "A", "header": "Bad Header"},
             "header must be an HTTP header name"),
            ({"url_prefix": "http://h/", "token_env": "A", "header": "X-Quebert-Auth"},
             "is computed by the worker or reserved"),
            ({"url_prefix": "http://h/", "token_env": "A", "header": "Host"},
             "is computed by the worker or reserved"),
            ({"url_prefix": "http://h/", "token_env": "A", "scheme": "Bearer x"},
             "scheme must be one word"),
            ({"url_prefix": "http://h/", "token_env": "A", "token_file": "/f"},
             "exactly one of token_env and token_file"),
            ({"url_prefix": "http://h/"}, "exactly one of token_env and token_file"),
            ({"url_prefix": "http://h/", "token_env": "NOT-A-NAME"},
             "token_env must be an environment variable's name"),
            ({"url_prefix": "http://h/", "token_env": "TOKEN\n"},
             "token_env must be an environment variable's name"),
            ({"url_prefix": "http://h/", "token_env": "A", "header": "X-Auth\n"},
             "header must be an HTTP header name"),
            ({"url_prefix": "http://h/", "token_env": "A", "scheme": "Bearer\n"},
             "scheme must be one word"),
            ({"url_prefix": "http://h/", "token_file": ""}, "token_file must be a file's path"),
        ):
            with self.assertRaises(ConfigurationError, msg=block) as caught:
                CredentialRule.from_config(block)
            self.assertIn(words, str(caught.exception))

    def test_settings_block(self):
        s = DispatchSettings.from_config({"credentials": [
            {"url_prefix": "http://127.0.0.1:8080/db/", "token_env": "SVC_TOKEN"},
            {"url_prefix": "https://api.example.com", "header": "X-Api-Key", "scheme": "",
             "token_file": "/run/secrets/api"},
        ]})
        self.assertEqual([r.url_prefix for r in s.credentials],
                         ["http://127.0.0.1:8080/db/", "https://api.example.com/"])
        self.assertEqual(DispatchSettings.from_config({}).credentials, ())

    def test_settings_errors(self):
        for block, words in (
            ({"credentials": {}}, "dispatch.credentials must be a list"),
            ({"credentials": [{"url_prefix": "http://h/", "token_env": "A"}, 5]},
             "dispatch.credentials[1] must be a JSON object"),
            ({"credentials": [{"url_prefix": "http://H:80/", "token_env": "A"},
                              {"url_prefix": "http://h/", "token_env": "B"}]},
             "dispatch.credentials[1]: the prefix 'http://h/' already has a rule"),
        ):
            with self.assertRaises(ConfigurationError, msg=block) as caught:
                DispatchSettings.from_config(block)
            self.assertIn(words, str(caught.exception))


class LoadTests(SynchronousTestCase):
    def assertFailsWithout(self, r, environ, *words):
        with self.assertRaises(ConfigurationError) as caught:
            r.load(environ)
        message = str(caught.exception)
        for word in words:
            self.assertIn(word, message)
        return message

    def test_from_the_environment(self):
        credential = rule().load({"SVC_TOKEN": f"  {TOKEN}\n"})
        self.assertEqual((credential.header, credential.value, credential.token),
                         ("Authorization", f"Bearer {TOKEN}", TOKEN))

    def test_defaults_to_os_environ(self):
        self.patch(os, "environ", {"SVC_TOKEN": TOKEN})
        self.assertEqual(rule().load().token, TOKEN)

    def test_missing_or_empty_variable(self):
        for environ in ({}, {"SVC_TOKEN": ""}, {"SVC_TOKEN": " \n"}):
            message = self.assertFailsWithout(
                rule(), environ, "the environment variable SVC_TOKEN", "not set or empty",
                "'http://127.0.0.1:8080/db/'")
            self.assertTrue(message.startswith("dispatch.credentials:"))

    def test_bad_values_are_never_shown(self):
        for value, words in (("s3cr7", "shorter than 8 characters"),
                             ("abc\r\ndefghij", "control, non-ASCII or line break"),
                             ("abcdéfghijkl", "control, non-ASCII or line break")):
            message = self.assertFailsWithout(rule(), {"SVC_TOKEN": value}, words)
            self.assertNotIn(value.strip(), message)

    def test_from_a_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        r = CredentialRule.from_config(
            {"url_prefix": "http://h/", "token_file": path, "scheme": "", "header": "X-Key"})
        credential = r.load({})
        self.assertEqual((credential.header, credential.value), ("X-Key", TOKEN))
        basic = CredentialRule.from_config({"url_prefix": "http://h/", "token_file": path,
                                            "scheme": "Basic"}).load({})
        self.assertEqual(basic.value, f"Basic {TOKEN}")

    def test_missing_empty_or_binary_file(self):
        missing = os.path.abspath(self.mktemp())
        r = CredentialRule.from_config({"url_prefix": "http://h/", "token_file": missing})
        self.assertFailsWithout(r, {}, f"the file {missing!r}", "cannot be read",
                                "No such file")
        with open(missing, "w") as f:
            f.write("\n\n")
        self.assertFailsWithout(r, {}, "which is empty")
        with open(missing, "wb") as f:
            f.write(b"\xff\xfe\x00")
        self.assertFailsWithout(r, {}, "not UTF-8 text")

    def test_settings_load_every_token(self):
        s = DispatchSettings.from_config({"credentials": [
            {"url_prefix": "http://a/", "token_env": "SVC_TOKEN"},
            {"url_prefix": "http://b/", "token_env": "MISSING_TOKEN"}]})
        with self.assertRaises(ConfigurationError) as caught:
            s.load_credentials(ENV)
        self.assertIn("MISSING_TOKEN", str(caught.exception))
        self.patch(os, "environ", {})
        self.assertRaises(ConfigurationError, s.dispatcher, Clock())
        dispatcher = s.dispatcher(Clock(), agent=object(),
                                  credentials=ServiceCredentials.load(s.credentials[:1], ENV))
        self.assertEqual(len(dispatcher.credentials.credentials), 1)

    def test_reprs_never_show_the_token(self):
        credentials = loaded()
        self.assertNotIn(TOKEN, repr(credentials))
        self.assertNotIn(TOKEN, str(credentials.credentials[0]))
        self.assertIn("http://127.0.0.1:8080/db/", repr(credentials))


class ClearTextTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self):
        return [formatEvent(e) for e in self.events
                if "plain http://" in (e.get("log_format") or "")]

    def test_plain_http_to_another_host_is_flagged_once_without_the_token(self):
        loaded(rule("http://app.internal:8080/db/"), rule("https://secure.test/db/"))
        shown = self.warnings()
        self.assertEqual(len(shown), 1, shown)
        self.assertIn("http://app.internal:8080/db/", shown[0])
        self.assertIn("https://", shown[0])
        self.assertNotIn(TOKEN, " ".join(shown))

    def test_https_and_this_machine_are_not_flagged(self):
        for prefix in ("https://app.test/db/", "http://127.0.0.1:8080/db/",
                       "http://127.3.2.1/db/", "http://localhost:8080/db/",
                       "http://api.localhost/db/", "http://[::1]:8080/db/"):
            self.assertFalse(rule(prefix).in_clear, prefix)
        loaded(rule("http://localhost:8080/"), rule("https://app.test/"))
        self.assertEqual(self.warnings(), [])

    def test_other_addresses_are_in_clear(self):
        for prefix in ("http://10.0.0.5/db/", "http://[2001:db8::1]/db/",
                       "http://localhost.example.com/db/"):
            self.assertTrue(rule(prefix).in_clear, prefix)


class MatchTests(SynchronousTestCase):
    def test_prefix_on_a_segment_boundary(self):
        credentials = ServiceCredentials.load(
            [rule("http://h/db/"), CredentialRule.from_config(
                {"url_prefix": "http://h/api", "token_env": "OTHER_TOKEN"})], ENV)
        for url, expected in (
            ("http://h/db/", "SVC_TOKEN"),
            ("http://h/db/x/y?q=1", "SVC_TOKEN"),
            ("http://h/db", None),
            ("http://h/dbx", None),
            ("http://h/db%2F", None),
            ("http://h/api", "OTHER_TOKEN"),
            ("http://h/api/v1", "OTHER_TOKEN"),
            ("http://h/api?x", "OTHER_TOKEN"),
            ("http://h/apix", None),
            ("http://h/", None),
        ):
            credential = credentials.for_url(url)
            self.assertEqual(credential and credential.rule.token_env, expected, url)

    def test_longest_prefix_wins(self):
        credentials = ServiceCredentials.load([
            rule("http://h/"),
            CredentialRule.from_config({"url_prefix": "http://h/db/site/",
                                        "token_env": "OTHER_TOKEN"}),
            rule("http://h/db/")], ENV)
        self.assertEqual(credentials.for_url("http://h/db/site/x").rule.url_prefix,
                         "http://h/db/site/")
        self.assertEqual(credentials.for_url("http://h/db/sitex").rule.url_prefix,
                         "http://h/db/")
        self.assertEqual(credentials.for_url("http://h/other").rule.url_prefix, "http://h/")

    def test_scheme_host_and_port(self):
        credentials = loaded(rule("http://Bücher.example/db/"), rule("https://h:8443/db/"),
                             rule("http://[::1]/db/"))
        for url, matches in (
            ("http://xn--bcher-kva.example/db/x", True),
            ("http://BÜCHER.example./db/x", True),
            ("http://bücher.example:80/db/x", True),
            ("http://bücher.example:8080/db/x", False),
            ("https://bücher.example/db/x", False),
            ("http://bücher.example.com/db/x", False),
            ("https://H:8443/db/x", True),
            ("https://h/db/x", False),
            ("http://h:8443/db/x", False),
            ("http://[0:0::1]:80/db/x", True),
            ("http://127.0.0.1/db/x", False),
        ):
            self.assertEqual(credentials.for_url(url) is not None, matches, url)

    def test_userinfo_never_matches(self):
        credentials = loaded(rule("http://h/db/"))
        for url in ("http://u:p@h/db/x", "http://u@h/db/x", "http://h@evil/db/x",
                    "http://evil/db/x?@h", "not a url"):
            self.assertIsNone(credentials.for_url(url), url)

    def test_dot_segments_never_match(self):
        credentials = loaded(rule("http://h/db/"))
        for url in ("http://h/db/../admin", "http://h/db/./x", "http://h/db/%2e%2E/admin",
                    "http://h/db/x%2F..%2F..%2Fadmin", "http://h/db/x\\..\\admin",
                    "http://h/db/..;/admin", "http://h/db/.;x/y"):
            self.assertIsNone(credentials.for_url(url), url)
        self.assertIsNotNone(credentials.for_url("http://h/db/..x/.y/;../a"))


class RedactTests(SynchronousTestCase):
    def test_every_token_and_a_trailing_fragment(self):
        credentials = ServiceCredentials.load(
            [rule("http://a/"), rule("http://b/", token_env="OTHER_TOKEN")], ENV)
        redact = credentials.redact
        self.assertEqual(redact(f"a {TOKEN} b {TOKEN}"), f"a {REDACTED} b {REDACTED}")
        self.assertEqual(redact("x other-0123456789 y"), f"x {REDACTED} y")
        self.assertEqual(redact(f"cut at {TOKEN[:10]}"), f"cut at {REDACTED}")
        self.assertEqual(redact(f"cut at {TOKEN[:4]}"), f"cut at {REDACTED}")
        self.assertEqual(redact(f"short {TOKEN[:3]}"), f"short {TOKEN[:3]}")
        self.assertEqual(redact(""), "")
        self.assertEqual(ServiceCredentials().redact(TOKEN), TOKEN)


class _Echo(Resource):
    """Answers with the request's headers in the body; status and Location set per path."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        headers = {k.decode().lower(): [v.decode() for v in vs]
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        auth = (headers.get("authorization") or [""])[0]
        path = request.path.decode()
        if path.endswith("/deny"):
            request.setResponseCode(401)
        elif path.endswith("/redirect"):
            request.setResponseCode(302)
            request.setHeader(b"Location", f"/landing?auth={auth}".encode())
        elif path.endswith("/long"):
            return b"x" * 1000 + auth.encode()
        return json.dumps(headers).encode()


class DispatcherTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.target = _Echo()
        self.agent = RequestTraversalAgent(self.target)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def dispatcher(self, *rules, **kwargs):
        credentials = ServiceCredentials.load(rules or (rule("https://app.test/db/"),), ENV)
        return URLDispatcher(self.clock, agent=self.agent, credentials=credentials,
                             policy=URLPolicy(), **kwargs)

    def dispatch(self, dispatcher, url, headers=None):
        d = dispatcher.dispatch(URLRequest(url, method="GET", headers=headers or {}),
                                queue="q", deadline=10,
                                extra_headers={"X-Quebert-TaskName": "t1"})
        self.agent.flush()
        return d

    def sent(self):
        return {k.decode().lower(): [v.decode() for v in vs]
                for k, vs in self.target.requests[-1].requestHeaders.getAllRawHeaders()}

    def logged(self):
        return "\n".join(formatEvent(e) + repr(e) for e in self.events)

    def test_token_added_under_the_prefix(self):
        result = self.successResultOf(self.dispatch(
            self.dispatcher(), "https://app.test/db/site/@@hook", {"X-Mine": "1"}))
        sent = self.sent()
        self.assertEqual(sent["authorization"], [f"Bearer {TOKEN}"])
        self.assertEqual((sent["x-mine"], sent["x-quebert-taskname"]), (["1"], ["t1"]))
        self.assertNotIn(TOKEN, result.body_prefix)
        self.assertIn(REDACTED, result.body_prefix)
        self.assertNotIn(TOKEN, json.dumps(result.to_record()))

    def test_task_cannot_override_or_forge_the_header(self):
        self.successResultOf(self.dispatch(
            self.dispatcher(), "https://app.test/db/x",
            {"authorization": "Bearer forged", "AUTHORIZATION": "Basic Zm9v"}))
        self.assertEqual(self.sent()["authorization"], [f"Bearer {TOKEN}"])
        text = self.logged()
        self.assertIn("header(s) dropped", text)
        self.assertIn("AUTHORIZATION, authorization", text)
        self.assertNotIn("forged", text)
        self.assertNotIn(TOKEN, text)

    def test_other_header_replaces_and_drops_authorization(self):
        keyed = CredentialRule.from_config({"url_prefix": "https://app.test/db/",
                                            "header": "X-Api-Key", "scheme": "",
                                            "token_env": "SVC_TOKEN"})
        self.successResultOf(self.dispatch(
            self.dispatcher(keyed), "https://app.test/db/x",
            {"x-api-key": "forged", "Authorization": "Bearer caller"}))
        sent = self.sent()
        self.assertEqual(sent["x-api-key"], [TOKEN])
        self.assertNotIn("authorization", sent)

    def test_no_token_outside_the_prefix(self):
        dispatcher = self.dispatcher()
        for url in ("https://app.test/dbx/x", "http://app.test/db/x", "https://app.test/db",
                    "https://app.test:444/db/x", "https://other.test/db/x",
                    "https://app.test/db/../admin"):
            self.successResultOf(self.dispatch(dispatcher, url))
            self.assertNotIn("authorization", self.sent(), url)
        self.successResultOf(self.dispatch(dispatcher, "https://app.test/dbx/x",
                                           {"Authorization": "Bearer own"}))
        self.assertEqual(self.sent()["authorization"], ["Bearer own"])

    def test_echoed_token_scrubbed_from_failures(self):
        dispatcher = self.dispatcher()
        for path in ("deny", "redirect"):
            failure = self.failureResultOf(
                self.dispatch(dispatcher, f"https://app.test/db/{path}"), DispatchError)
            error = error_info(failure)
            self.assertNotIn(TOKEN, json.dumps(error), path)
            self.assertNotIn(TOKEN, json.dumps(failure.value.response), path)
        self.assertIn(f"auth=Bearer {REDACTED}", error["message"])
        self.assertEqual(len(self.target.requests), 2)  # the redirect is not followed
        self.assertNotIn(TOKEN, self.logged())

    def test_echo_cut_by_the_body_prefix_limit(self):
        result = self.successResultOf(self.dispatch(
            self.dispatcher(body_prefix_limit=1020), "https://app.test/db/long"))
        # 1000 bytes of x, "Bearer ", then the token's first 13 characters
        self.assertEqual(result.body_prefix, "x" * 1000 + "Bearer " + REDACTED)


class DocsTests(SynchronousTestCase):
    """The examples of the docs are valid configurations."""

    def read(self, name):
        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", name)
        with open(path, encoding="utf-8") as f:
            return f.read()

    def test_url_tasks_example(self):
        import re

        blocks = re.findall(r"code-block:: json\n\n((?:    .*\n|\n)+)", self.read("url-tasks.rst"))
        [block] = [b for b in blocks if '"credentials"' in b]
        s = DispatchSettings.from_config(json.loads(block)["dispatch"])
        guillotina, api = s.credentials
        self.assertEqual((guillotina.url_prefix, guillotina.header, guillotina.auth_scheme,
                          guillotina.token_env),
                         ("http://127.0.0.1:8080/db/", "Authorization", "Bearer",
                          "GUILLOTINA_SERVICE_TOKEN"))
        self.assertEqual((api.url_prefix, api.header, api.auth_scheme, api.token_file),
                         ("https://api.example.com/v2", "X-Api-Key", "",
                          "/run/secrets/example-api-key"))
        credential = guillotina.load({"GUILLOTINA_SERVICE_TOKEN": TOKEN})
        self.assertEqual(credential.value, f"Bearer {TOKEN}")

    def test_configuration_example(self):
        import re

        text = self.read("configuration.rst")
        block = re.search(r'missing the worker stops .*?::\n\n((?:    [^\n]*\n)+)', text,
                          re.S).group(1)
        s = DispatchSettings.from_config(json.loads("{" + block + "}")["dispatch"])
        self.assertEqual([r.token_env for r in s.credentials], ["GUILLOTINA_SERVICE_TOKEN"])
