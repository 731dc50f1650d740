"""
A tiny HTTP server for the URL-task example: the "target" the worker calls.

    TARGET_PORT=8765 python examples/url_tasks/target.py

``/hello``  answers 200 at once.
``/flaky``  answers 503 (with ``Retry-After: 1``) twice, then 200.
``/slow``   answers 200 after 30 seconds (unless the client goes away first).
Anything else is 404.

Every request is printed on one line with the ``X-Quebert-*`` headers the
worker sent, so you can watch the attempts arrive.
"""

import os
import sys

from twisted.internet import reactor
from twisted.web import resource, server

PORT = int(os.environ.get("TARGET_PORT", "8765"))
SLOW_SECONDS = float(os.environ.get("TARGET_SLOW_SECONDS", "30"))


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Target(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.flaky_calls = 0

    def render(self, request):
        path = request.path.decode("utf-8", "replace")
        quebert = {
            k.decode().lower().replace("x-quebert-", ""): v[0].decode()
            for k, v in request.requestHeaders.getAllRawHeaders()
            if k.lower().startswith(b"x-quebert-")
        }
        shown = " ".join(f"{k}={v}" for k, v in sorted(quebert.items()))
        method = request.method.decode()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if path == "/hello":
            say(f"{method} {path} -> 200  [{shown}]")
            return b"hello from the target\n"
        if path == "/flaky":
            self.flaky_calls += 1
            if self.flaky_calls <= 2:
                say(f"{method} {path} -> 503 (call {self.flaky_calls})  [{shown}]")
                request.setResponseCode(503)
                request.setHeader(b"retry-after", b"1")
                return b"not yet, come back in a second\n"
            say(f"{method} {path} -> 200 (call {self.flaky_calls})  [{shown}]")
            return b"finally\n"
        if path == "/slow":
            say(f"{method} {path} -> answering in {SLOW_SECONDS:g} s  [{shown}]")
            call = reactor.callLater(SLOW_SECONDS, self._finish_slow, request)

            def gone(_):
                if call.active():
                    call.cancel()
                say(f"{method} {path}: the client went away before the answer")

            request.notifyFinish().addErrback(gone)
            return server.NOT_DONE_YET
        say(f"{method} {path} -> 404")
        request.setResponseCode(404)
        return b"no such thing\n"

    @staticmethod
    def _finish_slow(request) -> None:
        request.write(b"that took a while\n")
        request.finish()
        say("/slow answered 200")


def main() -> None:
    site = server.Site(Target())
    site.noisy = False
    reactor.listenTCP(PORT, site, interface="127.0.0.1")
    say(f"listening on http://127.0.0.1:{PORT}")
    reactor.run()


if __name__ == "__main__":
    main()
