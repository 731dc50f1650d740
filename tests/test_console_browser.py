"""
The operator's console in a real browser: headless Chromium from Debian
(``/usr/bin/chromium``) driven by Playwright for Python, against a real
``twistd amqp-worker --http-port`` on RabbitMQ and Redis.

Each scenario runs its browser in a thread (Playwright's synchronous API),
so that the test's reactor goes on.  Screenshots of every scenario are
saved in the test's temporary directory (``_trial_temp/...``), and in
``$QUEBERT_SCREENSHOTS`` when it is set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests._example import free_port
from tests._rabbit import make_vhost
from tests._redis import REDIS_URL
from tests._worker import WorkerProcess, wait_for

CHROMIUM = os.environ.get("QUEBERT_CHROMIUM", "/usr/bin/chromium")
RW = "console-rw-token-0123456789"
RO = "console-ro-token-0123456789"
#: Milliseconds a browser expectation may take.
WAIT_MS = 20_000


def _require_browser() -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("Playwright for Python (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        message = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            raise AssertionError(message + "; scripts/bootstrap.sh installs both")
        raise SkipTest(message)


class ConsoleBrowserTests(TestCase):
    """A worker with its HTTP API, and the console in Chromium."""

    timeout = 240

    async def setUp(self) -> None:
        _require_browser()
        self.amqp_url = make_vhost(self)
        self.prefix = f"quebert-test-console-{uuid.uuid4().hex[:12]}:"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.shots = os.path.abspath(self.mktemp())
        os.makedirs(self.shots)
        self.worker = WorkerProcess(
            self, self.amqp_url, REDIS_URL, self.prefix, tasks=("tests.tasks_console",),
            queues=("default:20",),
            extra=["--http-port", str(self.port), "--api-token", RW, "--api-read-token", RO,
                   "--shutdown-timeout", "2"]).start()
        await self.worker.ready()
        await wait_for(self._healthy, 30, what="the worker's API")
        self.addCleanup(self._cleanup_redis)

    def _cleanup_redis(self) -> Any:
        from tests.test_cli import delete_redis_prefix

        return deferToThread(delete_redis_prefix, self.prefix)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as answer:
                return answer.status == 200
        except Exception:
            return False

    # -- helpers (blocking: they run in the browser's thread) -----------------

    def api(self, method: str, path: str, body: Any = None, token: str = RW) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def add(self, task: str, *args: Any) -> str:
        status, record = self.api("POST", "/tasks", {"kind": "call", "task": task,
                                                    "args": list(args)})
        assert status == 201, (status, record)
        return record["id"]

    def until(self, predicate: Any, what: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def state_of(self, task_id: str) -> Optional[str]:
        status, record = self.api("GET", f"/tasks/{task_id}")
        return record["state"] if status == 200 else None

    @contextmanager
    def browser(self, token: str = RW) -> Iterator[Any]:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1300, "height": 900})
                page.set_default_timeout(WAIT_MS)
                page.problems = []  # type: ignore[attr-defined]
                page.on("pageerror", lambda e: page.problems.append(f"page error: {e}"))
                page.on("console", lambda m: m.type == "error"
                        and page.problems.append(f"console: {m.text}"))
                page.on("dialog", lambda d: (page.problems.append(f"dialog: {d.message}"),
                                             d.dismiss()))
                page.goto(self.base + "/ui/")
                page.fill("#token-input", token)
                page.click("#token-submit")
                page.wait_for_selector("#live.on")
                yield page
            finally:
                browser.close()

    def shot(self, page: Any, name: str) -> None:
        path = os.path.join(self.shots, name + ".png")
        page.screenshot(path=path, full_page=True)
        target = os.environ.get("QUEBERT_SCREENSHOTS")
        if target:
            os.makedirs(target, exist_ok=True)
            shutil.copy(path, os.path.join(target, name + ".png"))

    def run_in_browser(self, scenario: Any) -> Any:
        return deferToThread(scenario)

    # -- scenarios ----------------------------------------------------------------

    def test_queue_counts_move_and_a_paused_queue_is_resumed_from_the_page(self) -> Any:
        def scenario() -> None:
            assert self.api("POST", "/queues/default/pause")[0] == 200
            with self.browser() as page:
                ready = page.locator("#queues tr[data-queue=default] td[data-field=ready]")
                page.wait_for_selector("#queues tr[data-queue=default] .badge.paused")
                ids = [self.add("console.square", i) for i in range(7)]
                page.wait_for_function(
                    "() => document.querySelector("
                    "'#queues tr[data-queue=default] td[data-field=ready]').textContent === '7'")
                self.shot(page, "overview-paused")
                page.click("#queues tr[data-queue=default] button[data-action=resume]")
                page.wait_for_selector("#confirm-dialog[open]")
                page.click("#confirm-yes")
                page.wait_for_function(
                    "() => document.querySelector("
                    "'#queues tr[data-queue=default] td[data-field=ready]').textContent === '0'")
                self.until(lambda: all(self.state_of(i) == "succeeded" for i in ids),
                           "the tasks to succeed")
                page.wait_for_function(
                    "() => Number(document.querySelector("
                    "'#counts [data-state=succeeded] .card-number').textContent) >= 7")
                assert ready.text_content() == "0"
                assert page.locator("#workers tr[data-worker]").count() == 1
                self.shot(page, "overview")
                self.assertEqual(page.problems, [])

        return self.run_in_browser(scenario)

    def test_a_running_task_is_canceled_from_its_page(self) -> Any:
        def scenario() -> None:
            task_id = self.add("console.sleep", 60)
            self.until(lambda: self.state_of(task_id) == "running", "the task to run")
            with self.browser() as page:
                page.goto(f"{self.base}/ui/#/tasks/{task_id}")
                page.wait_for_selector("dd .badge.state-running")
                page.click("#cancel-task")
                page.wait_for_selector("#confirm-dialog[open]")
                self.shot(page, "cancel-confirm")
                page.click("#confirm-yes")
                page.wait_for_selector("dd .badge.state-canceled")
                assert page.locator("#cancel-task").count() == 0
                self.shot(page, "task-canceled")
                self.assertEqual(self.state_of(task_id), "canceled")
                self.assertEqual(page.problems, [])

        return self.run_in_browser(scenario)

    def test_a_failed_task_is_requeued_and_succeeds(self) -> Any:
        def scenario() -> None:
            flag = os.path.join(self.shots, "fails-once.flag")
            task_id = self.add("console.fails_once", flag)
            self.until(lambda: self.state_of(task_id) == "failed", "the task to fail")
            with self.browser() as page:
                page.goto(f"{self.base}/ui/#/tasks?state=failed")
                page.click(f"#tasks a[href='#/tasks/{task_id}']")
                page.wait_for_selector("dd .badge.state-failed")
                assert "planned failure: requeue me" in page.locator("#task-error").text_content()
                self.shot(page, "task-failed")
                page.click("#requeue-task")
                page.click("#confirm-yes")
                page.wait_for_selector("dd .badge.state-succeeded")
                assert "succeeded after a requeue" in page.locator("#task-result").text_content()
                rows = page.locator("#history tbody tr")
                assert rows.count() == 2, rows.count()
                self.shot(page, "task-requeued")
                self.assertEqual(page.problems, [])

        return self.run_in_browser(scenario)

    def test_the_read_token_sees_no_action(self) -> Any:
        def scenario() -> None:
            task_id = self.add("console.sleep", 60)
            self.until(lambda: self.state_of(task_id) == "running", "the task to run")
            with self.browser(token=RO) as page:
                page.wait_for_selector("#queues tr[data-queue=default]")
                assert page.locator("#access").text_content() == "read-only"
                assert page.locator("button[data-action]").count() == 0
                page.goto(f"{self.base}/ui/#/tasks/{task_id}")
                page.wait_for_selector("dd .badge.state-running")
                assert page.locator("#cancel-task").count() == 0
                assert page.locator("#requeue-task").count() == 0
                self.shot(page, "read-only")
                self.assertEqual(page.problems, [])
            status, body = self.api("DELETE", f"/tasks/{task_id}", token=RO)
            self.assertEqual((status, body["error"]["code"]), (403, "forbidden"))
            self.assertEqual(self.api("DELETE", f"/tasks/{task_id}")[0], 200)

        return self.run_in_browser(scenario)

    def test_hostile_arguments_are_shown_as_text(self) -> Any:
        hostile = ["<script>window.__pwned = 1</script>",
                   '<img src=x onerror="window.__pwned = 2">']

        def scenario() -> None:
            task_id = self.add("console.echo", *hostile)
            self.until(lambda: self.state_of(task_id) == "succeeded", "the task to succeed")
            with self.browser() as page:
                page.goto(f"{self.base}/ui/#/tasks?task=console.echo")
                page.wait_for_selector(f"#tasks tr[data-task='{task_id}']")
                page.goto(f"{self.base}/ui/#/tasks/{task_id}")
                page.wait_for_selector("#task-arguments")
                shown = page.locator("#task-arguments").text_content()
                for text in hostile:
                    assert json.dumps(text)[1:-1] in shown, shown
                assert "<script>" in page.locator("#task-result").text_content()
                assert page.evaluate("() => window.__pwned") is None
                assert page.locator("main script, main img").count() == 0
                self.shot(page, "hostile-arguments")
                self.assertEqual(page.problems, [])

        return self.run_in_browser(scenario)

    async def test_the_page_keeps_updating_across_a_worker_restart(self) -> None:
        browser_done = []

        def watch() -> None:
            with self.browser() as page:
                page.wait_for_selector("#workers tr[data-worker]")
                first = page.locator("#workers tr[data-worker]").first.get_attribute(
                    "data-worker")
                browser_done.append(("ready", first))
                page.wait_for_selector("#live.off", timeout=60_000)
                self.shot(page, "worker-restarting")
                page.wait_for_selector("#live.on", timeout=60_000)
                page.wait_for_function(
                    "(old) => [...document.querySelectorAll('#workers tr[data-worker]')]"
                    ".some((row) => row.dataset.worker !== old)", arg=first, timeout=60_000)
                before = float(page.evaluate("() => document.body.dataset.updated"))
                page.wait_for_function(
                    "(t) => Number(document.body.dataset.updated) > t", arg=before)
                self.shot(page, "worker-restarted")
                # the browser logs the stream cut and the refused reconnections
                browser_done.append(("done", [p for p in page.problems
                                              if "Failed to load resource: net::" not in p]))

        watching = deferToThread(watch)
        await wait_for(lambda: browser_done, 60, what="the console to show the worker")
        self.assertEqual(await self.worker.stop(), 0)
        self.worker.start()
        await self.worker.ready()
        await watching
        self.assertEqual(browser_done[-1], ("done", []))
