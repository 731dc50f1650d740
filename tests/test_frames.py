"""
Whole-delivery decoding (quebert.amqp._frames) against pika's own path.

Every test feeds the same bytes to a connection on pika's path and to one
on quebert's, and compares what their consumers receive, value for value.
"""

from __future__ import annotations

import random

import pika
from hypothesis import given
from hypothesis import strategies as st
from pika import exceptions, frame, spec
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from quebert.amqp import _frames
from quebert.amqp._frames import INCOMPLETE, MAX_FAST_BODY, decode_delivery
from quebert.amqp.connection import _pika_connection_class


def _sent_frames(transport):
    data = transport.value()
    transport.clear()
    frames, offset = [], 0
    while offset < len(data):
        consumed, value = frame.decode_frame(data[offset:])
        if not consumed:
            break
        offset += consumed
        frames.append(value)
    return frames


class _Peer:
    """A pika connection driven by hand-made broker frames, with consumers on two channels."""

    def __init__(self, connection_class):
        self.protocol = connection_class(pika.ConnectionParameters(heartbeat=0))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.received = []
        self.feed(frame.Method(0, spec.Connection.Start(
            server_properties={"capabilities": {"basic.nack": True,
                                                "consumer_cancel_notify": True,
                                                "publisher_confirms": True}},
            mechanisms=b"PLAIN", locales=b"en_US")))
        self.feed(frame.Method(0, spec.Connection.Tune(channel_max=2047, frame_max=131072,
                                                       heartbeat=0)))
        self.feed(frame.Method(0, spec.Connection.OpenOk()))
        self.channels = {}
        self.tags = {}
        for number in (1, 2):
            opened = []
            self.protocol.channel(number).addCallback(opened.append)
            self.feed(frame.Method(number, spec.Channel.OpenOk()))
            channel = self.channels[number] = opened[0]
            channel._channel.add_on_return_callback(self._returned)
            # pika's plain channel API: the callback gets what the assembler hands over
            channel._channel.basic_consume(f"q{number}", self._consumed)
            tag = [f.method.consumer_tag for f in _sent_frames(self.transport)
                   if isinstance(f, frame.Method) and isinstance(f.method, spec.Basic.Consume)]
            self.tags[number] = tag[0]
            self.feed(frame.Method(number, spec.Basic.ConsumeOk(consumer_tag=tag[0])))
        self.received.clear()

    def _consumed(self, channel, method, properties, body):
        fields = vars(method).copy()
        if fields["consumer_tag"] == self.tags.get(channel.channel_number):
            fields["consumer_tag"] = "ours"  # (each connection makes its own tags)
        self.received.append(("deliver", channel.channel_number, fields,
                              vars(properties).copy(), body))

    def _returned(self, channel, method, properties, body):
        self.received.append(("return", channel.channel_number, vars(method).copy(),
                              vars(properties).copy(), body))

    @property
    def impl(self):
        return self.protocol._impl

    def feed(self, *frames):
        self.protocol.dataReceived(b"".join(f.marshal() for f in frames))

    def feed_bytes(self, data, cuts=()):
        start = 0
        for cut in sorted(cuts):
            self.protocol.dataReceived(data[start:cut])
            start = cut
        self.protocol.dataReceived(data[start:])


def _delivery(channel, tag, body, properties, consumer_tag, redelivered=False,
              frame_max=131072, exchange="", routing_key="q"):
    """The frames of one delivery, the body split at ``frame_max`` as a broker does."""
    frames = [frame.Method(channel, spec.Basic.Deliver(
        consumer_tag=consumer_tag, delivery_tag=tag, redelivered=redelivered,
        exchange=exchange, routing_key=routing_key)),
        frame.Header(channel, len(body), properties)]
    step = frame_max - spec.FRAME_HEADER_SIZE - spec.FRAME_END_SIZE
    for offset in range(0, len(body), step):
        frames.append(frame.Body(channel, body[offset:offset + step]))
    return b"".join(f.marshal() for f in frames)


_text = st.text(max_size=20)
_short = st.text(st.characters(codec="utf-8"), max_size=30).filter(
    lambda s: len(s.encode()) < 256)
_header_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | _text
    | st.binary(max_size=10).map(bytes),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_short, inner, max_size=3),
    max_leaves=6)
_properties = st.builds(
    spec.BasicProperties,
    content_type=st.none() | _short,
    content_encoding=st.none() | _short,
    headers=st.none() | st.dictionaries(_short, _header_values, max_size=4),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 255),
    correlation_id=st.none() | _short,
    reply_to=st.none() | _short,
    expiration=st.none() | st.integers(0, 10**9).map(str),
    message_id=st.none() | _short,
    timestamp=st.none() | st.integers(0, 2**63 - 1),
    type=st.none() | _short,
    user_id=st.none() | _short,
    app_id=st.none() | _short,
    cluster_id=st.none() | _short,
)
_deliveries = st.lists(
    st.tuples(st.sampled_from([1, 2]), st.binary(max_size=300) | st.sampled_from(
        [b"", b"x" * 70000, b"y" * (MAX_FAST_BODY + 1)]), _properties, st.booleans(),
        _short, _short),
    min_size=1, max_size=8)


class DecodeDeliveryTests(SynchronousTestCase):
    """decode_delivery reads a whole delivery as pika's frame decoder would."""

    @given(_properties, st.binary(max_size=2000), st.booleans(), _short, _short,
           st.sampled_from([4096, 131072]))
    def test_a_complete_delivery_decodes_to_what_pika_decodes(
            self, properties, body, redelivered, exchange, routing_key, frame_max):
        data = _delivery(3, 2**40 + 7, body, properties, "ctag1.x", redelivered,
                         frame_max, exchange, routing_key)
        end, channel, frames, method, decoded, got = decode_delivery(b"junk" + data, 4)
        self.assertEqual((end, channel, got), (4 + len(data), 3, body))
        expected_frames, offset, pika_frames = [], 0, 0
        while offset < len(data):
            consumed, value = frame.decode_frame(data[offset:])
            offset += consumed
            pika_frames += 1
            expected_frames.append(value)
        self.assertEqual(frames, pika_frames)
        self.assertEqual(vars(method), vars(expected_frames[0].method))
        self.assertEqual(vars(decoded), vars(expected_frames[1].properties))
        self.assertIsInstance(method, spec.Basic.Deliver)
        self.assertIsInstance(decoded, spec.BasicProperties)

    def test_every_prefix_of_a_delivery_is_incomplete(self):
        props = spec.BasicProperties(content_type="application/json", delivery_mode=2,
                                     message_id="m", headers={"x-quebert-attempts": 0})
        data = _delivery(1, 1, b"a" * 5000, props, "ctag", frame_max=4096)
        for size in range(1, len(data)):
            self.assertIs(decode_delivery(data[:size], 0), INCOMPLETE, size)
        self.assertEqual(decode_delivery(data, 0)[0], len(data))

    def test_frames_that_are_not_a_delivery_are_left_to_pika(self):
        props = spec.BasicProperties()
        cases = {
            "heartbeat": frame.Heartbeat().marshal(),
            "another method": frame.Method(1, spec.Basic.Cancel(consumer_tag="c")).marshal(),
            "a returned message": frame.Method(1, spec.Basic.Return(
                reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="q")).marshal()
            + frame.Header(1, 1, props).marshal() + frame.Body(1, b"x").marshal(),
            "a body frame": frame.Body(1, b"x").marshal(),
            "the protocol header": b"AMQP\x00\x00\x09\x01",
        }
        for name, data in cases.items():
            self.assertIsNone(decode_delivery(data, 0), name)

    def test_a_delivery_unlike_what_a_broker_sends_is_left_to_pika(self):
        props = spec.BasicProperties(message_id="m")
        good = _delivery(1, 1, b"body", props, "ctag")
        method_end = good.index(b"\xce")  # the method frame's end marker
        header_at = method_end + 1
        cases = {
            "a bad frame end": good[:method_end] + b"\x00" + good[method_end + 1:],
            "a header on another channel": good[:header_at + 1] + b"\x00\x02"
            + good[header_at + 3:],
            "a body longer than announced": good[:good.rindex(frame.Body(1, b"body").marshal())]
            + frame.Body(1, b"body!").marshal(),
            "a body over the fast limit": _delivery(1, 1, b"z" * (MAX_FAST_BODY + 1), props,
                                                    "ctag"),
            "a consumer tag that is not UTF-8": _delivery(1, 1, b"", props, b"\xff\xfe"),
        }
        for name, data in cases.items():
            self.assertIsNone(decode_delivery(data, 0), name)


class DataReceivedTests(SynchronousTestCase):
    """A connection on quebert's path hands its consumers what pika's path would."""

    def peers(self):
        return _Peer(TwistedProtocolConnection), _Peer(_pika_connection_class())

    def assertSame(self, plain, fast):
        self.assertEqual(fast.received, plain.received)
        self.assertEqual(fast.impl.frames_received, plain.impl.frames_received)
        self.assertEqual(fast.impl.bytes_received, plain.impl.bytes_received)
        self.assertEqual(fast.impl._frame_buffer, plain.impl._frame_buffer)

    @given(_deliveries, st.lists(st.integers(0, 10**6), max_size=6), st.randoms())
    def test_random_deliveries_split_anywhere_reach_consumers_as_on_pikas_path(
            self, deliveries, cuts, rnd):
        plain, fast = self.peers()
        parts, tag = [], {1: 0, 2: 0}
        for channel, body, props, redelivered, exchange, routing_key in deliveries:
            tag[channel] += 1
            parts.append(_delivery(channel, tag[channel], body, props, plain.tags[channel],
                                   redelivered, exchange=exchange, routing_key=routing_key))
            if rnd.random() < 0.2:
                parts.append(frame.Heartbeat().marshal())
            if rnd.random() < 0.1:
                parts.append(frame.Method(channel, spec.Basic.Return(
                    reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="r")
                ).marshal() + frame.Header(channel, 3, props).marshal()
                    + frame.Body(channel, b"ret").marshal())
        data = b"".join(parts)
        cuts = [c % (len(data) + 1) for c in cuts]
        # consumer tags are per connection: give each its own
        fast_data = data
        for number in (1, 2):
            fast_data = fast_data.replace(plain.tags[number].encode(),
                                          fast.tags[number].encode())
        plain.feed_bytes(data, cuts)
        fast.feed_bytes(fast_data, cuts)
        self.assertEqual(len(plain.received),
                         len(deliveries) + sum(1 for p in parts if b"NO_ROUTE" in p))
        self.assertSame(plain, fast)

    def test_deliveries_take_the_fast_path(self):
        _, fast = self.peers()
        frames_read = []
        original = fast.impl._read_frame
        fast.impl._read_frame = lambda: frames_read.append(1) or original()
        props = spec.BasicProperties(content_type="application/json", delivery_mode=2,
                                     message_id="m", headers={"x-quebert-attempts": 0})
        data = b"".join(_delivery(1, n, b'{"v":1,"task":"t"}', props, fast.tags[1])
                        for n in range(1, 201))
        fast.feed_bytes(data, random.Random(3).sample(range(len(data)), 40))
        self.assertEqual(len(fast.received), 200)
        self.assertEqual([r[2]["delivery_tag"] for r in fast.received], list(range(1, 201)))
        self.assertEqual(frames_read, [])

    def test_a_partial_frame_of_another_kind_waits_for_its_rest(self):
        plain, fast = self.peers()
        data = frame.Method(1, spec.Basic.Return(
            reply_code=312, reply_text="NO_ROUTE", exchange="", routing_key="r")).marshal()
        data += frame.Header(1, 3, spec.BasicProperties()).marshal()
        data += frame.Body(1, b"ret").marshal()
        data += _delivery(1, 1, b"after", spec.BasicProperties(), plain.tags[1])
        for peer in (plain, fast):
            payload = data.replace(plain.tags[1].encode(), peer.tags[1].encode())
            peer.feed_bytes(payload, range(1, len(payload)))
        self.assertEqual([r[0] for r in fast.received], ["return", "deliver"])
        self.assertEqual([r[4] for r in fast.received], [r[4] for r in plain.received])

    def test_a_corrupt_frame_raises_as_on_pikas_path(self):
        for peer in self.peers():
            data = _delivery(1, 1, b"x", spec.BasicProperties(), peer.tags[1])
            data = data[:-1] + b"\x00"  # the body frame's end marker
            self.assertRaises(exceptions.InvalidFrameError, peer.feed_bytes, data)

    def test_a_body_longer_than_announced_raises_as_on_pikas_path(self):
        for peer in self.peers():
            data = frame.Method(1, spec.Basic.Deliver(
                consumer_tag=peer.tags[1], delivery_tag=1, redelivered=False, exchange="",
                routing_key="q")).marshal()
            data += frame.Header(1, 2, spec.BasicProperties()).marshal()
            data += frame.Body(1, b"abc").marshal()
            self.assertRaises(exceptions.BodyTooLongError, peer.feed_bytes, data)

    def test_a_connection_reset_by_a_consumer_drops_the_rest_as_on_pikas_path(self):
        plain, fast = self.peers()
        for peer in (plain, fast):
            peer._consumed_before = peer._consumed

            def reset(channel, method, properties, body, peer=peer):
                peer._consumed_before(channel, method, properties, body)
                peer.impl._frame_buffer = b""  # what pika's connection reset does

            peer.channels[1]._channel._consumers[peer.tags[1]] = reset
            data = b"".join(_delivery(1, n, b"b", spec.BasicProperties(), peer.tags[1])
                            for n in (1, 2, 3))
            peer.feed_bytes(data)
        self.assertEqual(len(fast.received), 1)
        self.assertEqual(len(plain.received), 1)
        self.assertEqual(fast.impl._frame_buffer, b"")

    def test_frames_of_other_channels_between_a_deliverys_frames(self):
        # the spec lets the broker interleave frames of other channels (and
        # heartbeats) with a delivery's: each channel is assembled on its own
        plain, fast = self.peers()
        for peer in (plain, fast):
            first = _delivery(1, 1, b"first", spec.BasicProperties(message_id="1"),
                              peer.tags[1])
            end_of_method = first.index(b"\xce") + 1
            end_of_header = first.index(b"\xce", end_of_method) + 1
            second = _delivery(2, 1, b"second", spec.BasicProperties(message_id="2"),
                               peer.tags[2])
            data = (first[:end_of_method] + frame.Heartbeat().marshal()
                    + first[end_of_method:end_of_header] + second + first[end_of_header:]
                    + _delivery(1, 2, b"third", spec.BasicProperties(), peer.tags[1]))
            peer.feed_bytes(data)
        self.assertSame(plain, fast)
        self.assertEqual([r[4] for r in fast.received], [b"second", b"first", b"third"])

    def test_a_consumer_that_raises_leaves_the_rest_for_later_as_on_pikas_path(self):
        plain, fast = self.peers()
        for peer in (plain, fast):
            peer._consumed_before = peer._consumed

            def fussy(channel, method, properties, body, peer=peer):
                peer._consumed_before(channel, method, properties, body)
                if body == b"1":
                    raise ZeroDivisionError("a consumer bug")

            peer.channels[1]._channel._consumers[peer.tags[1]] = fussy
            data = b"".join(_delivery(1, n, str(n).encode(), spec.BasicProperties(),
                                      peer.tags[1]) for n in (1, 2, 3))
            self.assertRaises(ZeroDivisionError, peer.feed_bytes, data)
            self.assertEqual(len(peer.received), 1)
            peer.feed_bytes(_delivery(1, 4, b"4", spec.BasicProperties(), peer.tags[1]))
        self.assertSame(plain, fast)
        self.assertEqual([r[4] for r in fast.received], [b"1", b"2", b"3", b"4"])

    def test_a_delivery_while_a_channel_is_mid_content_goes_through_pika(self):
        # a delivery too large to be decoded whole went frame by frame through
        # pika, and the broker (wrongly) starts another before its body is
        # complete: whatever pika makes of that, quebert's path makes too
        plain, fast = self.peers()
        for peer in (plain, fast):
            data = frame.Method(1, spec.Basic.Deliver(
                consumer_tag=peer.tags[1], delivery_tag=1, redelivered=False, exchange="",
                routing_key="q")).marshal()
            data += frame.Header(1, MAX_FAST_BODY + 10, spec.BasicProperties()).marshal()
            data += frame.Body(1, b"0123456789").marshal()
            data += frame.Method(1, spec.Basic.Deliver(
                consumer_tag=peer.tags[1], delivery_tag=2, redelivered=False, exchange="",
                routing_key="q")).marshal()
            data += frame.Header(1, 20, spec.BasicProperties()).marshal()
            data += frame.Body(1, b"abcdefghij").marshal()
            peer.feed_bytes(data)
        self.assertSame(plain, fast)
        self.assertEqual([r[4] for r in fast.received], [b"0123456789abcdefghij"])

    def test_a_whole_delivery_while_a_channel_is_mid_content_goes_through_pika(self):
        # as above, but the second delivery is complete in the buffer: pika
        # refuses it (its body adds to the first one's), and so does quebert
        plain, fast = self.peers()
        for peer in (plain, fast):
            data = frame.Method(1, spec.Basic.Deliver(
                consumer_tag=peer.tags[1], delivery_tag=1, redelivered=False, exchange="",
                routing_key="q")).marshal()
            data += frame.Header(1, MAX_FAST_BODY + 10, spec.BasicProperties()).marshal()
            data += frame.Body(1, b"0123456789").marshal()
            data += _delivery(1, 2, b"abc", spec.BasicProperties(), peer.tags[1])
            self.assertRaises(exceptions.BodyTooLongError, peer.feed_bytes, data)
        self.assertEqual(fast.received, [])
        self.assertSame(plain, fast)


class SupportTests(SynchronousTestCase):
    """A pika whose internals differ keeps its own path."""

    def test_this_pika_is_supported(self):
        _, fast = DataReceivedTests.peers(None)
        self.assertTrue(fast.protocol._whole_deliveries)

    def test_a_pika_without_the_internals_is_not_supported(self):
        _, fast = DataReceivedTests.peers(None)
        self.assertTrue(_frames.supported(fast.impl))
        del fast.impl._frame_buffer
        self.assertFalse(_frames.supported(fast.impl))
        self.assertFalse(_frames.supported(object()))

    def test_a_pika_without_the_internals_keeps_its_own_path(self):
        self.patch(_frames, "supported", lambda connection: False)
        plain, fast = DataReceivedTests.peers(None)
        self.assertFalse(fast.protocol._whole_deliveries)
        self.patch(_frames, "data_received", None)  # (never called)
        for peer in (plain, fast):
            peer.feed_bytes(_delivery(1, 1, b"x", spec.BasicProperties(), peer.tags[1]))
        self.assertEqual(fast.received, plain.received)
        self.assertEqual(len(fast.received), 1)


class RealBrokerTests(TestCase):
    """Messages from the real RabbitMQ reach a consumer on quebert's connection intact."""

    timeout = 60

    async def test_small_large_and_odd_messages_arrive_intact(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from tests._rabbit import RABBIT_HOST, RABBIT_PORT, make_vhost, publish_raw

        url = make_vhost(self, "quebert-test-frames")
        parameters = pika.URLParameters(url)
        protocol = _pika_connection_class()(parameters)
        await connectProtocol(TCP4ClientEndpoint(reactor, RABBIT_HOST, RABBIT_PORT), protocol)
        self.addCleanup(lambda: protocol.close() if protocol.is_open else None)
        await protocol.ready
        self.assertTrue(protocol._whole_deliveries)
        channel = await protocol.channel()
        await channel.queue_declare("frames", durable=False, auto_delete=False)
        rnd = random.Random(7)
        items = [
            (b"", spec.BasicProperties()),
            (b'{"v":1}', spec.BasicProperties(content_type="application/json", delivery_mode=2,
                                             message_id="m1",
                                             headers={"x-quebert-attempts": 0})),
            (b"a" * MAX_FAST_BODY, spec.BasicProperties(priority=3, expiration="60000",
                                                       timestamp=1700000000)),
            (b"b" * (MAX_FAST_BODY + 1), spec.BasicProperties(type="big")),
            (bytes(rnd.randrange(256) for _ in range(300000)),
             spec.BasicProperties(headers={"nested": {"list": [1, "two", None, True]},
                                           "bytes": b"\x00\xff", "long": 2**40})),
            ("ünïcødé".encode(), spec.BasicProperties(correlation_id="c", reply_to="r",
                                                       user_id="guest", app_id="a")),
        ]
        items += [(f"small {n}".encode(), spec.BasicProperties(message_id=str(n)))
                  for n in range(300)]
        await deferToThread(publish_raw, url, "frames", items)
        frames_read = []
        process_frame = protocol._impl._process_frame
        protocol._impl._process_frame = lambda f: frames_read.append(f) or process_frame(f)
        queue, _ = await channel.basic_consume(queue="frames", auto_ack=True)
        received = []
        for _ in items:
            _channel, method, properties, body = await queue.get()
            received.append((body, properties))
        self.assertEqual([b for b, _ in received], [b for b, _ in items])
        for (_, got), (_, sent) in zip(received, items):
            for field in ("content_type", "delivery_mode", "message_id", "priority",
                          "expiration", "timestamp", "type", "correlation_id", "reply_to",
                          "user_id", "app_id"):
                self.assertEqual(getattr(got, field), getattr(sent, field), field)
            self.assertEqual(got.headers, sent.headers)
        # pika's own path took the consume-ok and the two large deliveries
        # (3 and 5 frames), quebert's the 304 others
        self.assertEqual(len(frames_read), 9, frames_read)
