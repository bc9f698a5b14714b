"""A minimal MQTT 5 client for the load generator's simulated devices, and nothing else.

Why not paho or gmqtt (both used elsewhere in this project): the load generator must keep
~17,000 connections alive per process (20,000 open files per process here) on 2 shared
cores, 100,000 in all. paho needs a socket-level loop per client (``loop_read``,
``loop_write``, ``loop_misc``) and a ``Properties`` object per packet; 12 processes of it
could not keep 100,000 clients alive (38,814 keepalive timeouts, docs/PERFORMANCE.md).
gmqtt gives each client a reading task, a queue, a keepalive timer every keepalive/2 and a
resend coroutine, and cannot bind a source address (28,232 ephemeral ports per address).
The idle cost of each is measured by ``scripts/bench/mqtt_idle.py`` (figures in
docs/PERFORMANCE.md). A simulated device needs five packets, so this module writes them
itself: one ``asyncio.Protocol`` per connection, no task or timer of its own (the fleet pings
idle links from one timer for all), packets built with ``struct`` and bytes joins.

What it does: CONNECT (MQTT 5, clean start off, session expiry, a retained QoS 1 will),
PUBLISH QoS 0/1 with PUBACK tracking (unacknowledged ones are sent again, DUP set, after a
reconnect: the session's in-flight messages), SUBSCRIBE, PINGREQ, a normal DISCONNECT (no
will) or an abort (the will goes out). Incoming PUBLISH QoS 0/1 is acknowledged and handed
on. Not done: QoS 2, TLS, authentication, topic aliases, the broker's receive maximum (the
fleet keeps few messages in flight per device). It is a bench tool, not a device's client:
the agent uses paho (agent/core/mqtt.py).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
PINGREQ, PINGRESP, DISCONNECT = 12, 13, 14
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection: the broker drops the will
PROP_SESSION_EXPIRY = 0x11
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux 4.2


class ProtocolError(ValueError):
    """The broker sent something this client does not understand."""


def varint(n: int) -> bytes:
    """MQTT's variable byte integer (remaining length, property length)."""
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 0xFFFF:
        raise ValueError("string longer than 65,535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int, *, clean_start: bool, session_expiry: int,
                   will_topic: str | None = None, will_payload: bytes = b"",
                   will_qos: int = 1, will_retain: bool = True) -> bytes:
    flags = 0x02 if clean_start else 0
    if will_topic is not None:
        flags |= 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)
    props = bytes((PROP_SESSION_EXPIRY,)) + struct.pack("!I", session_expiry)
    body = (_str("MQTT") + bytes((5, flags)) + struct.pack("!H", keepalive)
            + varint(len(props)) + props + _str(client_id))
    if will_topic is not None:
        body += b"\x00" + _str(will_topic) + _str(will_payload)  # no will properties
    return _packet(CONNECT << 4, body)


def publish_packet(topic: str, payload: bytes, qos: int = 1, pid: int = 0,
                   retain: bool = False, dup: bool = False) -> bytes:
    first = (PUBLISH << 4) | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    head = _str(topic) + (struct.pack("!H", pid) if qos else b"") + b"\x00"  # no properties
    return _packet(first, head + payload)


def subscribe_packet(pid: int, topic: str, qos: int = 1) -> bytes:
    return _packet((SUBSCRIBE << 4) | 0x02, struct.pack("!H", pid) + b"\x00" + _str(topic)
                   + bytes((qos,)))


def puback_packet(pid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", pid)  # reason 0 and no properties may be left out


def take_packets(buf: bytearray) -> list[tuple[int, bytes]]:
    """Remove the complete packets at the head of ``buf``: [(first byte, body)]."""
    out, pos, end = [], 0, len(buf)
    while end - pos >= 2:
        n, shift, i = 0, 0, pos + 1
        while True:
            if i >= end:
                del buf[:pos]
                return out
            byte = buf[i]
            n |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("remaining length longer than 4 bytes")
        if end - i < n:
            break
        out.append((buf[pos], bytes(buf[i:i + n])))
        pos = i + n
    del buf[:pos]
    return out


def parse_publish(first: int, body: bytes) -> tuple[str, int, int, bytes]:
    """(topic, qos, packet id or 0, payload) of an MQTT 5 PUBLISH."""
    qos = (first >> 1) & 3
    if qos > 2:
        raise ProtocolError("PUBLISH with QoS 3")
    (tlen,) = struct.unpack_from("!H", body, 0)
    topic = body[2:2 + tlen].decode()
    pos = 2 + tlen
    pid = 0
    if qos:
        (pid,) = struct.unpack_from("!H", body, pos)
        pos += 2
    plen, shift = 0, 0
    while True:
        byte = body[pos]
        pos += 1
        plen |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return topic, qos, pid, body[pos + plen:]


class Client:
    """One device's MQTT session: survives its connections (packet ids, messages in flight).

    ``on_connect(session_present)``, ``on_message(topic, payload)`` and ``on_lost(error)``
    are called from the event loop; ``on_lost`` only for a connection that was up or being
    set up, not after :meth:`disconnect`."""

    def __init__(self, client_id: str, keepalive: int, *, session_expiry: int = 86400,
                 will_topic: str | None = None, will_payload: bytes = b"",
                 on_connect: Callable[[bool], None], on_message: Callable[[str, bytes], None],
                 on_lost: Callable[[Exception | None], None]) -> None:
        self.client_id, self.keepalive, self.session_expiry = client_id, keepalive, session_expiry
        self.will_topic, self.will_payload = will_topic, will_payload
        self.on_connect, self.on_message, self.on_lost = on_connect, on_message, on_lost
        self.inflight: dict[int, bytes] = {}  # packet id -> PUBLISH, until its PUBACK
        self._pid = 0
        self._conn: _Connection | None = None
        self.connected = False  # CONNACK received, link up
        self.last_out = 0.0  # monotonic time of the last packet written

    async def connect(self, host: str, port: int, local_addr: str | None = None) -> None:
        """Open a connection (from ``local_addr``, a source address, if given)."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if local_addr:
                # the port is chosen at connect, unique per destination, not at bind: a bind
                # to port 0 searches every port in use (4 ms a bind at 5,000 connections,
                # measured) and holds its port for any destination
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((local_addr, 0))
            await loop.sock_connect(sock, (host, port))
            await loop.create_connection(lambda: _Connection(self), sock=sock)
        except BaseException:
            sock.close()
            raise

    def _next_pid(self) -> int:
        for _ in range(65535):
            self._pid = self._pid % 65535 + 1
            if self._pid not in self.inflight:
                return self._pid
        raise RuntimeError("65,535 messages in flight")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send now if connected; a QoS 1 message waits in the session otherwise."""
        if qos == 0:
            if self.connected:
                self._write(publish_packet(topic, payload, 0, retain=retain))
            return
        pid = self._next_pid()
        packet = publish_packet(topic, payload, 1, pid, retain)
        self.inflight[pid] = packet
        if self.connected:
            self._write(packet)

    def subscribe(self, topic: str, qos: int = 1) -> None:
        if self.connected:
            self._write(subscribe_packet(self._next_pid(), topic, qos))

    def ping_if_idle(self, now: float, idle_s: float) -> bool:
        """A PINGREQ when nothing was written for ``idle_s`` (True if sent). paho, the
        agent's client, pings after a keepalive without a packet out; the broker cuts a
        link after 1.5 keepalives without one."""
        if self.connected and now - self.last_out >= idle_s:
            self._write(PINGREQ_PACKET)
            return True
        return False

    def disconnect(self) -> None:
        """A normal DISCONNECT: the broker drops the will."""
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None and conn.transport is not None:
            conn.transport.write(DISCONNECT_PACKET)
            conn.transport.close()

    def abort(self) -> None:
        """Drop the link without a word (the broker sends the will after it notices)."""
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    def _write(self, data: bytes) -> None:
        self._conn.transport.write(data)
        self.last_out = time.monotonic()

    # --- called by the connection ------------------------------------------------------------

    def _made(self, conn: _Connection) -> None:
        self._conn = conn
        conn.transport.write(connect_packet(
            self.client_id, self.keepalive, clean_start=False,
            session_expiry=self.session_expiry, will_topic=self.will_topic,
            will_payload=self.will_payload))
        self.last_out = time.monotonic()

    def _packet(self, conn: _Connection, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == PUBACK:
            if len(body) >= 2:
                self.inflight.pop(struct.unpack_from("!H", body)[0], None)
        elif kind == PUBLISH:
            topic, qos, pid, payload = parse_publish(first, body)
            if qos:
                self._write(puback_packet(pid))
            self.on_message(topic, payload)
        elif kind == CONNACK:
            if len(body) < 2 or body[1] != 0:
                raise ProtocolError(f"connection refused, reason {body[1:2].hex()}")
            self.connected = True
            for packet in list(self.inflight.values()):  # the session's in flight, DUP set
                self._write(bytes((packet[0] | 0x08,)) + packet[1:])
            self.on_connect(bool(body[0] & 1))
        elif kind == DISCONNECT:
            conn.transport.close()
        elif kind not in (SUBACK, PINGRESP):
            raise ProtocolError(f"unexpected packet type {kind}")

    def _lost(self, conn: _Connection, error: Exception | None) -> None:
        if self._conn is conn:  # not after disconnect()/abort(): those were asked for
            self._conn = None
            self.connected = False
            self.on_lost(error)


class _Connection(asyncio.Protocol):
    """One TCP connection of a :class:`Client`."""

    __slots__ = ("buf", "client", "transport")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client._made(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            for first, body in take_packets(self.buf):
                self.client._packet(self, first, body)
        except (ProtocolError, struct.error, IndexError, UnicodeDecodeError) as e:
            self.transport.abort()
            self.client._lost(self, e)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, exc)
