"""
Tests for quebert.dispatch.URLDispatcher against a real HTTP server on
127.0.0.1 (tests._http.LocalTarget), with real treq, the real guarded
agent and its connection pool.

Nothing here asserts on real time: slow resources hold their requests
until the test releases them, and the one deadline test only checks that
the deadline fired.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from quebert.dispatch import (
    DispatchResult,
    DispatchTimeout,
    QueueLimits,
    URLDispatcher,
    URLPolicy,
    URLRequest,
)
from quebert.errors import DispatchError, Reject, URLRefused
from tests._http import FakeResolver, LocalTarget

QUEUE = "web"


class DispatcherTestCase(TestCase):
    timeout = 10

    def setUp(self):
        self.target = LocalTarget(reactor).start()
        self.addCleanup(self.target.stop)

    def dispatcher(self, **kwargs):
        dispatcher = URLDispatcher(reactor, **kwargs)
        self.addCleanup(dispatcher.close)
        return dispatcher

    def dispatch(self, dispatcher, path, method="GET", deadline=5.0, **kwargs):
        request = URLRequest(url=self.target.url(path), method=method, **kwargs)
        return dispatcher.dispatch(request, queue=QUEUE, deadline=deadline)


class AnswerTests(DispatcherTestCase):
    """Any 2xx succeeds; any other status is a DispatchError with the answer."""

    @defer.inlineCallbacks
    def test_200(self):
        result = yield self.dispatch(self.dispatcher(), "ok")
        self.assertIsInstance(result, DispatchResult)
        self.assertEqual(result.status, 200)
        self.assertEqual(result.body_prefix, "hé, ok")
        self.assertEqual(result.headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(result.headers["etag"], '"v1"')
        self.assertNotIn("x-noise", result.headers)
        self.assertGreaterEqual(result.elapsed, 0)
        self.assertEqual(result.to_record(),
                         {"status": 200, "elapsed": result.elapsed, "body": "hé, ok"})
        json.dumps(result.to_record())

    @defer.inlineCallbacks
    def test_204(self):
        result = yield self.dispatch(self.dispatcher(), "nocontent", method="DELETE")
        self.assertEqual((result.status, result.body_prefix), (204, ""))

    @defer.inlineCallbacks
    def test_body_prefix_is_bounded(self):
        self.target.huge_size = 10_000
        result = yield self.dispatch(self.dispatcher(body_prefix_limit=16), "huge")
        self.assertEqual(result.body_prefix, "x" * 16)

    @defer.inlineCallbacks
    def test_404(self):
        error = yield self.assertFailure(self.dispatch(self.dispatcher(), "notfound"),
                                         DispatchError)
        self.assertTrue(error.transient)
        self.assertEqual(error.status, 404)
        self.assertIsNone(error.retry_after)
        self.assertIn("answered 404 Not Found", str(error))
        self.assertEqual(error.response["status"], 404)
        self.assertEqual(error.response["body"], "missing")
        json.dumps(error.response)

    @defer.inlineCallbacks
    def test_500_body_decoded_with_replacement(self):
        error = yield self.assertFailure(self.dispatch(self.dispatcher(), "error"),
                                         DispatchError)
        self.assertEqual(error.status, 500)
        self.assertEqual(error.response["body"], "\ufffd\ufffdboom")

    @defer.inlineCallbacks
    def test_429_retry_after_seconds(self):
        error = yield self.assertFailure(self.dispatch(self.dispatcher(), "busy"),
                                         DispatchError)
        self.assertEqual((error.status, error.retry_after), (429, 7.0))
        self.assertIn("Retry-After 7s", str(error))

    @defer.inlineCallbacks
    def test_503_retry_after_http_date(self):
        error = yield self.assertFailure(self.dispatch(self.dispatcher(), "unavailable"),
                                         DispatchError)
        self.assertEqual(error.status, 503)
        # The server wrote now + 30 s, truncated to the second.
        self.assertTrue(25 <= error.retry_after <= 30, error.retry_after)

    @defer.inlineCallbacks
    def test_redirect_not_followed(self):
        error = yield self.assertFailure(
            self.dispatch(self.dispatcher(), "redirect", method="POST", body=b"x"),
            DispatchError)
        self.assertEqual(error.status, 302)
        self.assertIn("redirect to '/ok' not followed", str(error))
        self.assertEqual(self.target.paths(), ["/redirect"])

    @defer.inlineCallbacks
    def test_no_cookies_kept_between_dispatches(self):
        dispatcher = self.dispatcher()
        yield self.dispatch(dispatcher, "setcookie")
        result = yield self.dispatch(dispatcher, "echo")
        self.assertNotIn("cookie", json.loads(result.body_prefix)["headers"])


class RequestTests(DispatcherTestCase):
    """What the target receives."""

    @defer.inlineCallbacks
    def _echo(self, dispatcher, extra_headers=None, **kwargs):
        request = URLRequest(url=self.target.url("echo"), **kwargs)
        result = yield dispatcher.dispatch(request, queue=QUEUE, deadline=5,
                                           extra_headers=extra_headers or {})
        return json.loads(result.body_prefix)

    @defer.inlineCallbacks
    def test_method_and_body(self):
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096), method="put",
                                body=b'{"a": 1}', headers={"Content-Type": "application/json"})
        self.assertEqual(seen["method"], "PUT")
        self.assertEqual(seen["body"], '{"a": 1}')
        self.assertEqual(seen["headers"]["content-type"], ["application/json"])
        self.assertEqual(seen["headers"]["content-length"], ["8"])

    @defer.inlineCallbacks
    def test_empty_post_has_content_length_zero(self):
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096))
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["headers"]["content-length"], ["0"])

    @defer.inlineCallbacks
    def test_headers(self):
        port = self.target.port.getHost().port
        seen = yield self._echo(
            self.dispatcher(body_prefix_limit=4096),
            headers={
                "Authorization": "Bearer t0ken",
                "X-Custom": "yes",
                "Host": "spoofed.example",
                "Content-Length": "999",
                "x-quebert-queuename": "spoofed",
                "X-Quebert-TaskRetryCount": "100",
            },
            extra_headers={"X-Quebert-QueueName": "web", "X-Quebert-TaskName": "t1"},
        )
        headers = seen["headers"]
        self.assertEqual(headers["authorization"], ["Bearer t0ken"])
        self.assertEqual(headers["x-custom"], ["yes"])
        self.assertEqual(headers["host"], [f"127.0.0.1:{port}"])
        self.assertEqual(headers["content-length"], ["0"])
        self.assertEqual(headers["x-quebert-queuename"], ["web"])
        self.assertEqual(headers["x-quebert-taskname"], ["t1"])
        self.assertNotIn("x-quebert-taskretrycount", headers)
        self.assertTrue(headers["user-agent"][0].startswith("quebert/"))

    @defer.inlineCallbacks
    def test_user_agent_kept_when_given(self):
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096),
                                headers={"user-agent": "mine/1"})
        self.assertEqual(seen["headers"]["user-agent"], ["mine/1"])

    @defer.inlineCallbacks
    def test_no_accept_encoding_added(self):
        """The answer is read as sent: the worker asks for no compression."""
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096))
        self.assertNotIn("accept-encoding", seen["headers"])
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096),
                                headers={"Accept-Encoding": "br"})
        self.assertEqual(seen["headers"]["accept-encoding"], ["br"])

    @defer.inlineCallbacks
    def test_query_string_kept(self):
        seen = yield self._echo(self.dispatcher(body_prefix_limit=4096))
        self.assertEqual(seen["path"], "/echo")
        request = URLRequest(url=self.target.url("echo?a=1&b=%20"), method="GET")
        result = yield self.dispatcher(body_prefix_limit=4096).dispatch(
            request, queue=QUEUE, deadline=5)
        self.assertEqual(json.loads(result.body_prefix)["path"], "/echo?a=1&b=%20")


class FailureTests(DispatcherTestCase):
    """Connection errors, the deadline, sizes."""

    @defer.inlineCallbacks
    def test_connection_refused(self):
        closed = reactor.listenTCP(0, self.target.port.factory, interface="127.0.0.1")
        port = closed.getHost().port
        yield closed.stopListening()
        request = URLRequest(url=f"http://127.0.0.1:{port}/ok")
        error = yield self.assertFailure(
            self.dispatcher().dispatch(request, queue=QUEUE, deadline=5), DispatchError)
        self.assertIsNone(error.status)
        self.assertIn("connection refused", str(error))
        self.assertEqual(error.response["error"], "connection refused")
        self.assertIsNone(error.response["status"])

    @defer.inlineCallbacks
    def test_deadline(self):
        dropped = self.target.arrival().addCallback(lambda r: r.notifyFinish())
        error = yield self.assertFailure(self.dispatch(self.dispatcher(), "hold", deadline=0.2),
                                         DispatchTimeout)
        self.assertIsInstance(error, DispatchError)
        self.assertIn("0.2s dispatch deadline", str(error))
        self.assertEqual(error.response["error"], "deadline exceeded")
        # The request was aborted: the server sees its connection dropped.
        yield self.assertFailure(dropped, Exception)

    @defer.inlineCallbacks
    def test_response_too_large_declared(self):
        dispatcher = self.dispatcher(policy=URLPolicy(max_response_size=1000))
        error = yield self.assertFailure(self.dispatch(dispatcher, "huge"), DispatchError)
        self.assertEqual(error.status, 200)
        self.assertIn("larger than max_response_size (1000 bytes)", str(error))

    @defer.inlineCallbacks
    def test_response_too_large_counted(self):
        self.target.huge_size = 1024 * 1024
        dispatcher = self.dispatcher(policy=URLPolicy(max_response_size=10_000),
                                     body_prefix_limit=10)
        error = yield self.assertFailure(self.dispatch(dispatcher, "hugechunked"),
                                         DispatchError)
        self.assertIn("larger than max_response_size", str(error))
        self.assertEqual(error.response["body"], "y" * 10)
        # The connection was dropped, not kept in the pool.
        self.assertEqual(dispatcher.pool_stats()["idle"], 0)

    def test_request_too_large(self):
        dispatcher = self.dispatcher(policy=URLPolicy(max_request_size=10))
        d = self.dispatch(dispatcher, "echo", method="POST", body=b"x" * 11)
        error = self.failureResultOf(d, URLRefused).value
        self.assertIsInstance(error, Reject)
        self.assertIn("larger than max_request_size (10 bytes)", str(error))
        self.assertEqual(self.target.requests, [])

    @defer.inlineCallbacks
    def test_closed_dispatcher(self):
        dispatcher = self.dispatcher()
        yield dispatcher.close()
        error = yield self.assertFailure(self.dispatch(dispatcher, "ok"), DispatchError)
        self.assertIn("closed", str(error))


class GuardrailTests(DispatcherTestCase):
    """Refused URLs are never requested."""

    def test_metadata_address_refused_without_connecting(self):
        resolver = FakeResolver({})
        dispatcher = self.dispatcher(resolver=resolver)
        d = dispatcher.dispatch(URLRequest(url="http://169.254.169.254/latest/meta-data/"),
                                queue=QUEUE, deadline=5)
        error = self.failureResultOf(d, URLRefused).value
        self.assertIn("169.254.0.0/16", str(error))
        self.assertEqual(resolver.asked, [])
        self.assertEqual(dispatcher.pool_stats()["in_flight"], 0)

    def test_scheme_refused(self):
        d = self.dispatcher().dispatch(URLRequest(url="file:///etc/passwd"), queue=QUEUE,
                                       deadline=5)
        self.assertIn("scheme 'file' is not allowed", str(self.failureResultOf(d, URLRefused)
                                                           .value))

    @defer.inlineCallbacks
    def test_host_resolving_to_denied_address(self):
        port = self.target.port.getHost().port
        resolver = FakeResolver({"evil.test": ["127.0.0.1", "169.254.169.254"]})
        dispatcher = self.dispatcher(resolver=resolver)
        error = yield self.assertFailure(
            dispatcher.dispatch(URLRequest(url=f"http://evil.test:{port}/ok"), queue=QUEUE,
                                deadline=5),
            URLRefused)
        self.assertIn("evil.test (169.254.169.254)", str(error))
        self.assertEqual(resolver.asked, ["evil.test"])
        self.assertEqual(self.target.connections, [])

    @defer.inlineCallbacks
    def test_host_resolving_to_allowed_address(self):
        port = self.target.port.getHost().port
        resolver = FakeResolver({"svc.test": ["127.0.0.1"]})
        dispatcher = self.dispatcher(resolver=resolver, body_prefix_limit=4096)
        result = yield dispatcher.dispatch(URLRequest(url=f"http://svc.test:{port}/echo"),
                                           queue=QUEUE, deadline=5)
        seen = json.loads(result.body_prefix)
        self.assertEqual(seen["headers"]["host"], [f"svc.test:{port}"])

    @defer.inlineCallbacks
    def test_loopback_denied_by_policy(self):
        dispatcher = self.dispatcher(policy=URLPolicy(deny_networks=("loopback",)))
        error = yield self.assertFailure(self.dispatch(dispatcher, "ok"), URLRefused)
        self.assertIn("127.0.0.0/8", str(error))
        self.assertEqual(self.target.connections, [])

    @defer.inlineCallbacks
    def test_allow_list_of_networks(self):
        policy = URLPolicy(deny_networks=("0.0.0.0/0", "::/0"),
                           allow_networks=("127.0.0.0/8",))
        result = yield self.dispatch(self.dispatcher(policy=policy), "ok")
        self.assertEqual(result.status, 200)

    @defer.inlineCallbacks
    def test_host_not_in_allow_hosts(self):
        dispatcher = self.dispatcher(policy=URLPolicy(allow_hosts=("*.example.com",)))
        error = yield self.assertFailure(self.dispatch(dispatcher, "ok"), URLRefused)
        self.assertIn("not in allow_hosts", str(error))


class LimitTests(DispatcherTestCase):
    """Per-queue concurrency, the connection bound, cancellation."""

    @defer.inlineCallbacks
    def wait_for(self, condition):
        for _ in range(200):
            if condition():
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        self.fail("condition never held")

    @defer.inlineCallbacks
    def drain(self, ds):
        """Release held requests one by one until every dispatch fired."""
        while not all(d.called for d in ds):
            yield self.wait_for(lambda: self.target.held or all(d.called for d in ds))
            self.target.release()
        results = yield defer.gatherResults(ds)
        self.assertEqual([r.status for r in results], [200] * len(ds))

    @defer.inlineCallbacks
    def test_max_concurrent_dispatches(self):
        dispatcher = self.dispatcher(limits={QUEUE: QueueLimits(max_concurrent_dispatches=2)})
        ds = [self.dispatch(dispatcher, "hold") for _ in range(5)]
        self.assertEqual(dispatcher.stats()[QUEUE]["waiting"], 3)
        yield self.wait_for(lambda: self.target.in_flight == 2)
        self.assertEqual(dispatcher.stats()[QUEUE]["in_flight"], 2)
        for done in range(5):
            self.target.release()
            yield self.wait_for(lambda n=done: sum(d.called for d in ds) == n + 1)
            yield self.wait_for(lambda n=done: self.target.in_flight == min(2, 4 - n))
        results = yield defer.gatherResults(ds)
        self.assertEqual([r.status for r in results], [200] * 5)
        self.assertEqual(self.target.max_in_flight, 2)
        self.assertEqual(dispatcher.stats()[QUEUE]["in_flight"], 0)
        self.assertEqual(dispatcher.stats()[QUEUE]["waiting"], 0)

    @defer.inlineCallbacks
    def test_other_queues_are_not_limited(self):
        dispatcher = self.dispatcher(limits={QUEUE: QueueLimits(max_concurrent_dispatches=1)})
        first = self.dispatch(dispatcher, "hold")
        other = dispatcher.dispatch(URLRequest(url=self.target.url("ok")), queue="other",
                                    deadline=5)
        result = yield other
        self.assertEqual(result.status, 200)
        self.assertFalse(first.called)
        self.target.release()
        yield first

    @defer.inlineCallbacks
    def test_max_connections(self):
        dispatcher = self.dispatcher(max_connections=2)
        ds = [self.dispatch(dispatcher, "hold") for _ in range(4)]
        yield self.wait_for(lambda: self.target.in_flight == 2)
        self.assertEqual(dispatcher.pool_stats()["waiting"], 2)
        self.assertEqual(dispatcher.pool_stats()["in_flight"], 2)
        yield self.drain(ds)
        self.assertEqual(self.target.max_in_flight, 2)
        self.assertLessEqual(len(self.target.connections), 2)
        self.assertLessEqual(dispatcher.pool_stats()["idle"], 2)

    @defer.inlineCallbacks
    def test_max_connections_per_host(self):
        dispatcher = self.dispatcher(max_connections_per_host=1)
        ds = [self.dispatch(dispatcher, "hold") for _ in range(3)]
        yield self.wait_for(lambda: self.target.in_flight == 1)
        yield self.drain(ds)
        self.assertEqual(self.target.max_in_flight, 1)
        self.assertEqual(len(self.target.connections), 1)

    @defer.inlineCallbacks
    def test_persistent_connection_reused(self):
        dispatcher = self.dispatcher()
        for _ in range(3):
            yield self.dispatch(dispatcher, "ok")
        self.assertEqual(len(self.target.connections), 1)
        self.assertEqual(dispatcher.pool_stats()["idle"], 1)

    @defer.inlineCallbacks
    def test_cancel_while_waiting(self):
        dispatcher = self.dispatcher(limits={QUEUE: QueueLimits(max_concurrent_dispatches=1)})
        first = self.dispatch(dispatcher, "hold")
        second = self.dispatch(dispatcher, "ok")
        self.assertEqual(dispatcher.stats()[QUEUE]["waiting"], 1)
        second.cancel()
        self.failureResultOf(second, defer.CancelledError)
        self.assertEqual(dispatcher.stats()[QUEUE]["waiting"], 0)
        yield self.wait_for(lambda: self.target.in_flight == 1)
        self.target.release()
        result = yield first
        self.assertEqual(result.status, 200)
        self.assertEqual(self.target.paths(), ["/hold"])

    @defer.inlineCallbacks
    def test_cancel_in_flight(self):
        dispatcher = self.dispatcher()
        arrived = self.target.arrival()
        d = self.dispatch(dispatcher, "hold")
        request = yield arrived
        finished = request.notifyFinish()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        # The server sees the connection dropped.
        yield self.assertFailure(finished, Exception)
        self.assertEqual(dispatcher.stats()[QUEUE]["in_flight"], 0)
        self.assertEqual(dispatcher.pool_stats()["in_flight"], 0)

    @defer.inlineCallbacks
    def test_close_cancels_outstanding(self):
        dispatcher = URLDispatcher(reactor)
        arrived = self.target.arrival()
        d = self.dispatch(dispatcher, "hold")
        yield arrived
        yield dispatcher.close()
        self.failureResultOf(d, defer.CancelledError)


def _self_signed(name):
    """A key and a self-signed certificate for ``name`` (PEM), made on the spot."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


class TLSTests(DispatcherTestCase):
    """https: connected by address, verified against the URL's host name."""

    def setUp(self):
        from twisted.internet import ssl

        self.target = LocalTarget(reactor)
        pem = _self_signed("svc.test")
        certificate = ssl.PrivateCertificate.loadPEM(pem)
        site = self.target.start().port.factory
        self.target.port.stopListening()
        self.target.port = reactor.listenSSL(0, site, certificate.options(),
                                             interface="127.0.0.1")
        self.addCleanup(self.target.stop)
        self.trust = ssl.Certificate.loadPEM(pem)
        self.resolver = FakeResolver({"svc.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})

    def tls_policy(self):
        from twisted.internet.ssl import optionsForClientTLS

        trust = self.trust

        class Policy:
            def creatorForNetloc(self, hostname, port):
                return optionsForClientTLS(hostname.decode("ascii"), trustRoot=trust)

        return Policy()

    def https(self, host, path="ok"):
        port = self.target.port.getHost().port
        dispatcher = self.dispatcher(resolver=self.resolver, tls_policy=self.tls_policy())
        return dispatcher.dispatch(URLRequest(url=f"https://{host}:{port}/{path}"),
                                   queue=QUEUE, deadline=5)

    @defer.inlineCallbacks
    def test_https(self):
        result = yield self.https("svc.test")
        self.assertEqual(result.status, 200)

    @defer.inlineCallbacks
    def test_certificate_for_another_name(self):
        error = yield self.assertFailure(self.https("other.test"), DispatchError)
        self.assertIsNone(error.status)
        self.assertIn("TLS error", str(error))
        self.assertEqual(self.target.requests, [])
