"""
Unit tests of URLDispatcher's judgement of answers, deterministic: treq's
in-memory agent (``treq.testing.RequestTraversalAgent``, what ``StubTreq``
runs on) serves twisted.web resources, and a Clock stands for the reactor,
so deadlines and Retry-After dates are exact.
"""

from __future__ import annotations

from treq.testing import RequestTraversalAgent, StringStubbingResource
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, server
from twisted.web.resource import Resource

from quebert.dispatch import DispatchTimeout, URLDispatcher, URLPolicy, URLRequest
from quebert.errors import DispatchError, URLRefused

T0 = 1_700_000_000.0


class _Hold(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render(self, request):
        self.requests.append(request)
        return server.NOT_DONE_YET


class StubTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(T0)

    def serve(self, resource, **kwargs):
        self.agent = RequestTraversalAgent(resource)
        self.dispatcher = URLDispatcher(self.clock, agent=self.agent, **kwargs)

    def answer(self, status, headers=None, body=b""):
        def respond(method, url, params, headers_, data):
            return status, headers or {}, body

        self.serve(StringStubbingResource(respond))

    def dispatch(self, url="https://target.test/task", deadline=10.0, **kwargs):
        d = self.dispatcher.dispatch(URLRequest(url, **kwargs), queue="q", deadline=deadline)
        self.agent.flush()
        return d


class JudgementTests(StubTestCase):
    def test_every_2xx_succeeds(self):
        for status in (200, 201, 202, 204, 299):
            self.answer(status, body=b"" if status == 204 else b"fine")
            result = self.successResultOf(self.dispatch())
            self.assertEqual(result.status, status)

    def test_every_other_status_fails(self):
        for status in (300, 301, 304, 400, 401, 403, 410, 499, 500, 502, 504):
            self.answer(status)
            error = self.failureResultOf(self.dispatch(), DispatchError).value
            self.assertEqual(error.status, status)
            self.assertTrue(error.transient)
            self.assertNotIsInstance(error, URLRefused)

    def test_redirect_names_the_location(self):
        self.answer(301, {"Location": "https://elsewhere.test/x"})
        error = self.failureResultOf(self.dispatch(), DispatchError).value
        self.assertIn("redirect to 'https://elsewhere.test/x' not followed", str(error))
        self.assertEqual(error.response["status"], 301)

    def test_retry_after_only_for_429_and_503(self):
        self.answer(500, {"Retry-After": "30"})
        self.assertIsNone(self.failureResultOf(self.dispatch(), DispatchError).value.retry_after)
        self.answer(503, {"Retry-After": "30"})
        self.assertEqual(self.failureResultOf(self.dispatch(), DispatchError).value.retry_after,
                         30)

    def test_retry_after_date_against_the_reactor_clock(self):
        self.answer(429, {"Retry-After": http.datetimeToString(T0 + 90).decode()})
        error = self.failureResultOf(self.dispatch(), DispatchError).value
        self.assertEqual(error.retry_after, 90)

    def test_retry_after_clamped(self):
        self.answer(429, {"Retry-After": "99999999"})
        error = self.failureResultOf(self.dispatch(), DispatchError).value
        self.assertEqual(error.retry_after, 24 * 3600)

    def test_unreadable_retry_after_ignored(self):
        self.answer(429, {"Retry-After": "soon"})
        self.assertIsNone(self.failureResultOf(self.dispatch(), DispatchError).value.retry_after)

    def test_error_body_prefix_bounded(self):
        self.serve(StringStubbingResource(lambda *a: (500, {}, b"e" * 5000)),
                   body_prefix_limit=100)
        error = self.failureResultOf(self.dispatch(), DispatchError).value
        self.assertEqual(error.response["body"], "e" * 100)

    def test_too_large_2xx_fails(self):
        self.serve(StringStubbingResource(lambda *a: (200, {}, b"z" * 5000)),
                   policy=URLPolicy(max_response_size=4999))
        error = self.failureResultOf(self.dispatch(), DispatchError).value
        self.assertIn("max_response_size (4999 bytes)", str(error))

    def test_exactly_max_response_size_succeeds(self):
        self.serve(StringStubbingResource(lambda *a: (200, {}, b"z" * 5000)),
                   policy=URLPolicy(max_response_size=5000))
        self.assertEqual(self.successResultOf(self.dispatch()).status, 200)

    def test_refused_request_checks(self):
        self.answer(200)
        for kwargs, reason in (
            ({"method": "TRACE"}, "method 'TRACE' is not allowed"),
            ({"headers": {"Bad Name": "x"}}, "not a valid HTTP header name"),
            ({"headers": {"X-Split": "a\r\nInjected: yes"}}, "header 'X-Split' is not valid"),
        ):
            error = self.failureResultOf(self.dispatch(**kwargs), URLRefused).value
            self.assertIn(reason, str(error))

    def test_deadline_must_be_positive(self):
        self.answer(200)
        self.assertRaises(ValueError, self.dispatch, deadline=0)


class DeadlineAndCancelTests(StubTestCase):
    def setUp(self):
        super().setUp()
        self.hold = _Hold()
        self.serve(self.hold)

    def test_deadline(self):
        d = self.dispatch(deadline=30)
        self.assertEqual(len(self.hold.requests), 1)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.agent.flush()
        error = self.failureResultOf(d, DispatchTimeout).value
        self.assertEqual(error.response["elapsed"], 30)
        self.assertEqual(self.dispatcher.stats()["q"]["in_flight"], 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_covers_reading_the_body(self):
        d = self.dispatch(deadline=30)
        request = self.hold.requests[0]
        request.write(b"partial")
        self.agent.flush()
        self.assertNoResult(d)
        self.clock.advance(30)
        self.agent.flush()
        self.failureResultOf(d, DispatchTimeout)

    def test_answer_in_time_cancels_the_timer(self):
        d = self.dispatch(deadline=30)
        request = self.hold.requests[0]
        request.write(b"done")
        request.finish()
        self.agent.flush()
        self.assertEqual(self.successResultOf(d).body_prefix, "done")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_in_flight(self):
        d = self.dispatch()
        lost = self.hold.requests[0].notifyFinish()
        d.cancel()
        self.agent.flush()
        self.failureResultOf(d, defer.CancelledError)
        self.failureResultOf(lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_reading_the_body(self):
        d = self.dispatch()
        request = self.hold.requests[0]
        request.write(b"partial")
        self.agent.flush()
        lost = request.notifyFinish()
        d.cancel()
        self.agent.flush()
        self.failureResultOf(d, defer.CancelledError)
        self.failureResultOf(lost)


class VerdictTests(StubTestCase):
    """The policy's verdicts on requests it let through are remembered, exactly."""

    def setUp(self):
        super().setUp()
        self.serve(StringStubbingResource(lambda *a: (200, {}, b"ok")))
        self.checked = []

        def counting(request):
            self.checked.append(request.url)
            return self.dispatcher.policy.check_request(request)

        self.dispatcher._check_request = counting

    def dispatch(self, url, **kwargs):
        d = self.dispatcher.dispatch(URLRequest(url, **kwargs), queue="q", deadline=10)
        self.agent.flush()
        return d

    def test_same_request_checked_once(self):
        for _ in range(3):
            self.successResultOf(self.dispatch("https://target.test/a", body=b"1"))
        self.successResultOf(self.dispatch("https://target.test/a", body=b"22"))
        self.assertEqual(self.checked, ["https://target.test/a"])
        self.successResultOf(self.dispatch("https://target.test/b"))
        self.successResultOf(self.dispatch("https://target.test/a", method="PUT"))
        self.successResultOf(self.dispatch("https://target.test/a", headers={"X-A": "1"}))
        self.assertEqual(len(self.checked), 4)

    def test_refusals_checked_every_time(self):
        for _ in range(2):
            self.failureResultOf(self.dispatch("https://169.254.169.254/"), URLRefused)
            self.failureResultOf(self.dispatch("https://target.test/a",
                                               headers={"X-A": "a\nb"}), URLRefused)
        self.assertEqual(len(self.checked), 4)

    def test_body_size_is_part_of_the_verdict(self):
        self.dispatcher.policy = URLPolicy(max_request_size=4)
        self.successResultOf(self.dispatch("https://target.test/a", body=b"1234"))
        self.failureResultOf(self.dispatch("https://target.test/a", body=b"12345"),
                             URLRefused)

    def test_forgotten_when_the_policy_is_replaced(self):
        self.successResultOf(self.dispatch("https://target.test/a"))
        self.dispatcher.policy = URLPolicy(deny_hosts=("target.test",))
        self.failureResultOf(self.dispatch("https://target.test/a"), URLRefused)

    def test_bounded(self):
        from quebert.dispatch.dispatcher import VERDICTS

        for i in range(VERDICTS + 10):
            self.successResultOf(self.dispatch(f"https://target.test/{i}"))
        self.assertLessEqual(len(self.dispatcher._verdicts), VERDICTS)


class LoggingTests(StubTestCase):
    """Structured events in quebert.dispatch; no bodies, secrets or query strings."""

    def setUp(self):
        super().setUp()
        from twisted.logger import globalLogPublisher

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def dispatch_secret(self):
        d = self.dispatcher.dispatch(
            URLRequest("https://target.test/hook?api_key=k3y", body=b"secret-body",
                       headers={"Authorization": "Bearer t0ken"}),
            queue="q", deadline=10, extra_headers={"X-Quebert-TaskName": "t1"})
        self.agent.flush()
        return d

    def assertNothingSecret(self):
        from twisted.logger import formatEvent

        ours = [e for e in self.events if e.get("log_namespace") == "quebert.dispatch"]
        self.assertTrue(ours)
        for event in ours:
            text = formatEvent(event) + repr(event)
            for secret in ("t0ken", "secret-body", "k3y"):
                self.assertNotIn(secret, text)
            self.assertEqual(event["queue"], "q")
            self.assertEqual(event["task"], "t1")
        return ours

    def test_failure(self):
        self.answer(500, body=b"no")
        self.failureResultOf(self.dispatch_secret(), DispatchError)
        [event] = self.assertNothingSecret()
        self.assertEqual(event["status"], 500)
        self.assertEqual(event["url"], "https://target.test/hook?...")

    def test_success(self):
        self.answer(200)
        self.dispatcher.task_log_level = LogLevel.debug
        self.successResultOf(self.dispatch_secret())
        self.assertNothingSecret()

    def test_success_not_logged_above_debug(self):
        """A 2xx is logged only at task log level debug (the worker's --log-level)."""
        self.answer(200)
        self.assertEqual(self.dispatcher.task_log_level, LogLevel.info)
        self.successResultOf(self.dispatch_secret())
        self.assertEqual([e for e in self.events
                          if e.get("log_namespace") == "quebert.dispatch"], [])

    def test_refused(self):
        self.answer(200)
        d = self.dispatcher.dispatch(
            URLRequest("https://169.254.169.254/?token=k3y", body=b"secret-body"),
            queue="q", deadline=10, extra_headers={"X-Quebert-TaskName": "t1"})
        self.failureResultOf(d, URLRefused)
        ours = [e for e in self.events if e.get("log_namespace") == "quebert.dispatch"]
        self.assertEqual(len(ours), 1)
        self.assertNotIn("secret-body", repr(ours[0]))
        self.assertNotIn("k3y", repr(ours[0]))
