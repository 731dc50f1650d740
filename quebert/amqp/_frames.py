# -*- test-case-name: tests.test_frames -*-
"""
Decoding whole deliveries from the broker's byte stream in one step.

pika decodes a ``Basic.Deliver`` as three frames, each through its general
frame decoder, the connection's callback registry, the channel's content
assembler and a re-slice of its input buffer: about 14 us per delivery on a
2-vCPU machine, a quarter of the worker's CPU per no-op task.  When a
delivery's method, header and body frames are all in the buffer,
:func:`decode_delivery` reads them with a few ``struct`` calls and builds
the same ``Basic.Deliver`` and ``BasicProperties`` objects pika would;
:func:`data_received` hands them to the channel exactly where pika's
content assembler would (``Channel._on_deliver``), and leaves every other
frame (and any delivery it cannot take whole) to pika's own path.

The result for the consumer is the same, value for value (the tests
compare both paths on random deliveries, split at random places, between
other frames).  What pika's path would reject (a bad frame end, a body
longer than announced...) is left to pika, which raises its own errors.
"""

from __future__ import annotations

import struct
from typing import Any, Optional, Tuple

from pika import frame, spec
from pika.data import decode_table

#: Bodies up to this size are decoded whole; larger ones go frame by frame
#: through pika, so that a large message is never waited for whole in the
#: buffer (each read would copy all of it again).
MAX_FAST_BODY = 65536

_HEADER = struct.Struct(">BHL")  # frame type, channel, size
_METHOD_ID = struct.Struct(">I")
_QBYTE = struct.Struct(">QB")  # delivery tag, bits
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, flags
_Q = struct.Struct(">Q")

_DELIVER = spec.Basic.Deliver.INDEX
_BASIC = spec.Basic.INDEX
_FRAME_END = spec.FRAME_END
_END = spec.FRAME_END_SIZE
_HEAD = spec.FRAME_HEADER_SIZE

#: :func:`decode_delivery`'s answer when the buffer ends inside a delivery
#: it will be able to decode once the rest has arrived.
INCOMPLETE = "incomplete"

_Deliver = spec.Basic.Deliver
_Properties = spec.BasicProperties
_Method = frame.Method
_Header = frame.Header

_F_CONTENT_TYPE = _Properties.FLAG_CONTENT_TYPE
_F_CONTENT_ENCODING = _Properties.FLAG_CONTENT_ENCODING
_F_HEADERS = _Properties.FLAG_HEADERS
_F_DELIVERY_MODE = _Properties.FLAG_DELIVERY_MODE
_F_PRIORITY = _Properties.FLAG_PRIORITY
_F_CORRELATION_ID = _Properties.FLAG_CORRELATION_ID
_F_REPLY_TO = _Properties.FLAG_REPLY_TO
_F_EXPIRATION = _Properties.FLAG_EXPIRATION
_F_MESSAGE_ID = _Properties.FLAG_MESSAGE_ID
_F_TIMESTAMP = _Properties.FLAG_TIMESTAMP
_F_TYPE = _Properties.FLAG_TYPE
_F_USER_ID = _Properties.FLAG_USER_ID
_F_APP_ID = _Properties.FLAG_APP_ID
_F_CLUSTER_ID = _Properties.FLAG_CLUSTER_ID
_RARE = (_F_CONTENT_ENCODING | _F_PRIORITY | _F_CORRELATION_ID | _F_REPLY_TO | _F_EXPIRATION
         | _F_TIMESTAMP | _F_TYPE | _F_USER_ID | _F_APP_ID | _F_CLUSTER_ID)


def _shortstr(buf: bytes, offset: int) -> Tuple[Any, int]:
    """pika's ``decode_short_string``: UTF-8 text, or the bytes if not UTF-8."""
    end = offset + 1 + buf[offset]
    value = buf[offset + 1:end]
    try:
        return value.decode("utf8"), end
    except UnicodeDecodeError:
        return value, end


def _properties(buf: bytes, offset: int, end: int, flags: int) -> Optional[Any]:
    """The ``BasicProperties`` of a header frame's payload ``buf[offset:end]``."""
    props = _Properties.__new__(_Properties)
    if flags & _F_CONTENT_TYPE:
        props.content_type, offset = _shortstr(buf, offset)
    else:
        props.content_type = None
    if flags & _F_CONTENT_ENCODING:
        props.content_encoding, offset = _shortstr(buf, offset)
    else:
        props.content_encoding = None
    if flags & _F_HEADERS:
        props.headers, offset = decode_table(buf, offset)
    else:
        props.headers = None
    if flags & _F_DELIVERY_MODE:
        props.delivery_mode = buf[offset]
        offset += 1
    else:
        props.delivery_mode = None
    if flags & _RARE:
        if flags & _F_PRIORITY:
            props.priority = buf[offset]
            offset += 1
        else:
            props.priority = None
        if flags & _F_CORRELATION_ID:
            props.correlation_id, offset = _shortstr(buf, offset)
        else:
            props.correlation_id = None
        if flags & _F_REPLY_TO:
            props.reply_to, offset = _shortstr(buf, offset)
        else:
            props.reply_to = None
        if flags & _F_EXPIRATION:
            props.expiration, offset = _shortstr(buf, offset)
        else:
            props.expiration = None
    else:
        props.priority = props.correlation_id = props.reply_to = props.expiration = None
    if flags & _F_MESSAGE_ID:
        props.message_id, offset = _shortstr(buf, offset)
    else:
        props.message_id = None
    if flags & _RARE:
        if flags & _F_TIMESTAMP:
            props.timestamp = _Q.unpack_from(buf, offset)[0]
            offset += 8
        else:
            props.timestamp = None
        if flags & _F_TYPE:
            props.type, offset = _shortstr(buf, offset)
        else:
            props.type = None
        if flags & _F_USER_ID:
            props.user_id, offset = _shortstr(buf, offset)
        else:
            props.user_id = None
        if flags & _F_APP_ID:
            props.app_id, offset = _shortstr(buf, offset)
        else:
            props.app_id = None
        if flags & _F_CLUSTER_ID:
            props.cluster_id, offset = _shortstr(buf, offset)
        else:
            props.cluster_id = None
    else:
        props.timestamp = props.type = props.user_id = props.app_id = props.cluster_id = None
    if offset > end:
        return None  # the fields overrun the frame: pika's path says what is wrong
    return props


def decode_delivery(buf: bytes, pos: int) -> Any:
    """
    The delivery that starts at ``buf[pos]``, if it is one and complete.

    Returns ``(end, channel, frames, deliver, properties, body)``, where
    ``end`` is the offset just past its last frame and ``frames`` how many
    frames it took; :data:`INCOMPLETE` when ``buf`` ends inside a delivery
    that will be decodable here once the rest arrives; ``None`` when the
    next frame is anything else or anything about the delivery is unusual
    (pika's own path then takes the frame).
    """
    size = len(buf)
    if size - pos < _HEAD + 4:
        return INCOMPLETE if size > pos and buf[pos] == 1 else None
    kind, channel, length = _HEADER.unpack_from(buf, pos)
    if kind != 1 or _METHOD_ID.unpack_from(buf, pos + _HEAD)[0] != _DELIVER:
        return None
    method_end = pos + _HEAD + length
    # the header frame's fixed part: frame header, class, weight, size, flags
    if size < method_end + _END + _HEAD + 14:
        return INCOMPLETE
    if buf[method_end] != _FRAME_END:
        return None
    try:
        offset = pos + _HEAD + 4
        tag_end = offset + 1 + buf[offset]
        consumer_tag = buf[offset + 1:tag_end].decode("utf8")
        delivery_tag, bits = _QBYTE.unpack_from(buf, tag_end)
        exchange, offset = _shortstr(buf, tag_end + 9)
        routing_key, offset = _shortstr(buf, offset)
    except (IndexError, UnicodeDecodeError, struct.error):
        return None
    if offset != method_end:
        return None
    head = method_end + _END
    kind, hchannel, hlength = _HEADER.unpack_from(buf, head)
    if kind != 2 or hchannel != channel:
        return None
    class_id, _, body_size, flags = _CONTENT.unpack_from(buf, head + _HEAD)
    if class_id != _BASIC or flags & 1 or body_size > MAX_FAST_BODY:
        return None
    header_end = head + _HEAD + hlength
    if size <= header_end:
        return INCOMPLETE
    if buf[header_end] != _FRAME_END:
        return None
    # the body frames
    frames = 2
    offset = header_end + _END
    if body_size == 0:
        body = b""
    else:
        parts = []
        seen = 0
        while seen < body_size:
            if size < offset + _HEAD:
                return INCOMPLETE
            kind, bchannel, blength = _HEADER.unpack_from(buf, offset)
            if kind != 3 or bchannel != channel:
                return None
            body_end = offset + _HEAD + blength
            if size <= body_end:
                return INCOMPLETE
            if buf[body_end] != _FRAME_END:
                return None
            parts.append(buf[offset + _HEAD:body_end])
            seen += blength
            frames += 1
            offset = body_end + _END
        if seen != body_size:
            return None  # longer than announced: pika raises BodyTooLongError
        body = parts[0] if frames == 3 else b"".join(parts)
    try:
        properties = _properties(buf, head + _HEAD + 14, header_end, flags)
    except Exception:  # whatever pika would raise, it raises on its own path
        return None
    if properties is None:
        return None
    deliver = _Deliver.__new__(_Deliver)
    deliver.consumer_tag = consumer_tag
    deliver.delivery_tag = delivery_tag
    deliver.redelivered = bits & 1 != 0
    deliver.exchange = exchange
    deliver.routing_key = routing_key
    return offset, channel, frames, deliver, properties, body


def supported(connection: Any) -> bool:
    """
    Whether ``connection`` (a pika ``Connection``) has the internals that
    :func:`data_received` uses, as pika 1.3 and 1.4 do; a pika that changed
    them keeps its own path.
    """
    from pika.channel import Channel, ContentFrameAssembler

    return (
        all(callable(getattr(connection, name, None))
            for name in ("_read_frame", "_trim_frame_buffer", "_process_frame"))
        and all(hasattr(connection, name)
                for name in ("_frame_buffer", "_channels", "frames_received", "bytes_received"))
        and callable(getattr(Channel, "_on_deliver", None))
        and hasattr(ContentFrameAssembler(), "_method_frame")
    )


def _mid_content(channels: Any, buf: bytes, pos: int) -> bool:
    """Whether the frame at ``pos`` is for a channel whose assembler holds part of a message."""
    if len(buf) - pos < 3:
        return False
    channel = channels.get(int.from_bytes(buf[pos + 1:pos + 3], "big"))
    return channel is not None and channel._content_assembler._method_frame is not None


def data_received(connection: Any, data_in: bytes) -> None:
    """
    pika's ``Connection._on_data_available`` for ``connection`` (a pika
    ``Connection``), with complete deliveries decoded by
    :func:`decode_delivery` and given to their channel's ``_on_deliver``, as
    pika's content assembler does.  Everything else goes through pika's own
    path one frame at a time.  A delivery split over reads waits for its
    rest (bodies up to :data:`MAX_FAST_BODY`), so it is decoded whole too.

    pika never registers a connection callback for ``Basic.Deliver`` (its
    channels route deliveries to consumers themselves), so these frames
    would not have met one on pika's path either.
    """
    buf = connection._frame_buffer + data_in if connection._frame_buffer else data_in
    connection._frame_buffer = buf
    pos = 0
    channels = connection._channels
    size = len(buf)
    try:
        while pos < size:
            decoded = decode_delivery(buf, pos)
            if decoded is INCOMPLETE:
                if not _mid_content(channels, buf, pos):
                    return
                decoded = None
            if decoded is not None:
                end, number, frames, deliver, properties, body = decoded
                channel = channels.get(number)
                if channel is not None and channel._content_assembler._method_frame is None:
                    connection.frames_received += frames
                    connection.bytes_received += end - pos
                    pos = end
                    channel._on_deliver(_Method(number, deliver),
                                        _Header(number, len(body), properties), body)
                    if connection._frame_buffer is not buf:
                        return  # the connection was reset meanwhile: drop the rest
                    continue
            # one frame through pika's own path
            if pos:
                buf = connection._frame_buffer = buf[pos:]
                pos = 0
            consumed, value = connection._read_frame()
            if not value:
                return  # a partial frame: wait for the rest
            connection._trim_frame_buffer(consumed)
            connection._process_frame(value)
            buf = connection._frame_buffer
            size = len(buf)
    finally:
        # what was decoded here is consumed, as on pika's path, even when a
        # consumer raised (unless the connection was reset meanwhile)
        if pos and connection._frame_buffer is buf:
            connection._frame_buffer = buf[pos:]
