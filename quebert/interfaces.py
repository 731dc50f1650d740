"""
The pluggable parts of quebert, as ``zope.interface`` interfaces.

The mediator only talks to a broker and a state store through these, so a
test (or ``quebert.testing``) can put in-memory doubles in their place and
still run the real mediator path.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from quebert.state.interface import IStateManager

__all__ = ["IBroker", "IStateManager"]


class IBroker(Interface):
    """
    Where tasks come from and where their outcomes go.

    Every ``publish*`` Deferred fires only once the message is durable
    (confirmed by the broker); the mediator acks the original after that.
    """

    exchange = Attribute("Name of the main exchange tasks are published to.")

    def publish(queue: str, body: bytes, headers: dict, *, message_id: str,
                content_type: str = "application/json", delay: float = 0.0):
        """
        Publish a task body to work queue ``queue``, delivered after
        ``delay`` seconds (0: at once).  Declares ``queue`` if needed.
        """

    def publish_errored(queue: str, body: bytes, headers: dict, *, message_id: str,
                        content_type: str = "application/json"):
        """Publish a copy of a task to the errored queue of ``queue``."""

    def consume(queue: str, prefetch: int, on_delivery):
        """
        Keep consuming ``queue`` with at most ``prefetch`` unacked
        messages, calling ``on_delivery(delivery)`` for each.  A delivery
        has ``queue``, ``body``, ``headers``, ``content_type``,
        ``message_id``, ``redelivered``, ``delivery_count``, ``ack()`` and
        ``nack(requeue)``.
        """

    def pause_consuming():
        """Stop all consumers; fires when the broker confirmed it."""

    def close_consumers():
        """Close the consuming channels: unacked messages are redelivered."""
