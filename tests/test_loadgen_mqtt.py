"""The load generator's minimal MQTT 5 client (scripts/bench/loadgen_mqtt.py): its packets,
and a session against a real mosquitto (will, PUBACK tracking, messages kept across a drop)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))

import loadgen_mqtt as m

from tests.conftest import Watcher


@pytest.mark.parametrize("n, size", [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3),
                                     (2_097_152, 4), (268_435_455, 4)])
def test_varint_sizes_and_decodes_back(n, size):
    encoded = m.varint(n)
    assert len(encoded) == size
    # a PUBLISH whose remaining length is n decodes back through take_packets' reader
    buf = bytearray(b"\x30" + encoded)
    if n:
        assert m.take_packets(buf) == []  # body not there yet: nothing taken, nothing lost
        assert bytes(buf) == b"\x30" + encoded
    if n <= 20_000:
        buf += b"x" * n
        assert m.take_packets(buf) == [(0x30, b"x" * n)]
        assert not buf


def test_publish_round_trip_across_split_reads():
    one = m.publish_packet("ttcs/dev/x/event", b'{"seq":1}', 1, 7, retain=True)
    two = m.publish_packet("ttcs/dev/x/health", b"h" * 300, 0)
    stream = one + two + m.PINGREQ_PACKET
    buf, got = bytearray(), []
    for i in range(0, len(stream), 5):  # a few bytes per read, as TCP may deliver
        buf += stream[i:i + 5]
        got += m.take_packets(buf)
    assert not buf
    assert [first >> 4 for first, _ in got] == [m.PUBLISH, m.PUBLISH, m.PINGREQ]
    assert m.parse_publish(*got[0]) == ("ttcs/dev/x/event", 1, 7, b'{"seq":1}')
    assert got[0][0] & 1  # retained
    assert m.parse_publish(*got[1]) == ("ttcs/dev/x/health", 0, 0, b"h" * 300)


def test_a_remaining_length_over_four_bytes_is_refused():
    with pytest.raises(m.ProtocolError):
        m.take_packets(bytearray(b"\x30\xff\xff\xff\xff\x01"))


def test_a_session_against_mosquitto(broker):
    watcher = Watcher(broker.port, ["lg/#"])
    events: list = []

    async def scenario() -> None:
        got = asyncio.Event()
        up = asyncio.Event()

        def connected(present: bool) -> None:
            events.append(("connect", present))
            client.subscribe("lg/dev-1/cmd")
            up.set()

        def message(topic: str, payload: bytes) -> None:
            events.append((topic, payload))
            got.set()

        client = m.Client("lg-dev-1", 10, will_topic="lg/dev-1/status",
                          will_payload=b'{"state":"offline"}', on_connect=connected,
                          on_message=message, on_lost=lambda e: events.append(("lost", e)))
        await client.connect("127.0.0.1", broker.port, "127.0.0.2")
        await asyncio.wait_for(up.wait(), 10)
        client.publish("lg/dev-1/event", b'{"seq":1}')
        assert client.inflight  # until its PUBACK
        for _ in range(100):
            if not client.inflight:
                break
            await asyncio.sleep(0.05)
        assert not client.inflight
        await asyncio.sleep(0.2)  # the SUBACK
        watcher.client.publish("lg/dev-1/cmd", b'{"type":"resend"}', qos=1)
        await asyncio.wait_for(got.wait(), 10)
        # dropped without DISCONNECT: the will goes out; what is published meanwhile waits
        client.abort()
        client.publish("lg/dev-1/event", b'{"seq":2}')
        assert not client.connected and len(client.inflight) == 1
        up.clear()
        await client.connect("127.0.0.1", broker.port)
        await asyncio.wait_for(up.wait(), 10)
        for _ in range(100):
            if not client.inflight:
                break
            await asyncio.sleep(0.05)
        assert not client.inflight
        client.disconnect()

    asyncio.run(scenario())
    watcher.wait_for(lambda: len(watcher.json("/event")) == 2, what="both events")
    assert [e["seq"] for e in watcher.json("/event")] == [1, 2]
    wills = [(t, p, r) for t, p, r in watcher.messages if t == "lg/dev-1/status"]
    assert wills and json.loads(wills[0][1]) == {"state": "offline"}
    assert ("lg/dev-1/cmd", b'{"type":"resend"}') in events
    assert events[0] == ("connect", False)
    assert ("connect", True) in events  # the persistent session was there on reconnect
    assert not [e for e in events if e[0] == "lost"]  # abort() and disconnect() were asked for
    watcher.client.disconnect()
