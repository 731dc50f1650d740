"""The ``twistd amqp-worker`` plugin; everything lives in :mod:`quebert.tap`."""

from twisted.application.service import ServiceMaker

amqp_worker = ServiceMaker(
    "quebert AMQP worker",
    "quebert.tap",
    "Run quebert tasks from RabbitMQ, with retries and Redis task state.",
    "amqp-worker",
)
