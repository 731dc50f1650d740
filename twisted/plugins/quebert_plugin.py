"""
The ``twistd amqp-worker`` and ``twistd quebert-api`` plugins; everything
lives in :mod:`quebert.tap` and :mod:`quebert.api_tap`.
"""

from twisted.application.service import ServiceMaker

amqp_worker = ServiceMaker(
    "quebert AMQP worker",
    "quebert.tap",
    "Run quebert tasks from RabbitMQ, with retries and Redis task state.",
    "amqp-worker",
)

quebert_api = ServiceMaker(
    "quebert HTTP task API",
    "quebert.api_tap",
    "Serve quebert's HTTP task API (push, inspect, cancel tasks) without running tasks.",
    "quebert-api",
)
