"""The relay's MQTT link (ctl/relaylink.py: gmqtt on its own thread) against a real mosquitto:
its persistent session keeps what was published while it was away, it reconnects after the
broker restarts and subscribes again, it waits for a broker that is not up yet, and it is
called from other threads. Over TLS with a controller certificate: tests/test_tls_acl.py."""

from __future__ import annotations

import queue
import threading

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from ctl.relaylink import RelayLink
from tests.conftest import Broker, free_port, wait_until

TOPIC = "ttcs/dev/d1/health"


class Link:
    """A RelayLink recording what it receives, subscribing to TOPIC at each connect."""

    def __init__(self, port: int, protocol: str = "5", client_id: str = "relay-test") -> None:
        self.got: queue.Queue = queue.Queue()
        self.threads: set[str] = set()
        cfg = {"host": "127.0.0.1", "port": port, "protocol": protocol, "keepalive_s": 5,
               "connect_timeout_s": 2, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}
        self.link = RelayLink(cfg, client_id, on_message=self._on_message,
                              on_connect=lambda: self.link.subscribe([(TOPIC, 1)]))
        self.link.start()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self.threads.add(threading.current_thread().name)
        self.got.put((topic, payload, retained))

    def subscribed(self) -> bool:
        """Connected, and a message published now reaches it (SUBACK may lag CONNACK)."""
        if not self.link.connected.is_set():
            return False
        publish(self.link.cfg["port"], b"probe")
        try:
            while self.got.get(timeout=0.3)[1] != b"probe":
                pass
            return True
        except queue.Empty:
            return False

    def next(self, timeout: float = 10) -> tuple[str, bytes, bool]:
        return self.got.get(timeout=timeout)


def publish(port: int, payload: bytes, topic: str = TOPIC, retain: bool = False) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{free_port()}")
    c.connect("127.0.0.1", port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_the_session_keeps_what_came_while_the_relay_was_away(broker, protocol):
    a = Link(broker.port, protocol)
    wait_until(a.subscribed, 15, what="relay link subscribed")
    publish(broker.port, b"live")
    assert a.next() == (TOPIC, b"live", False)
    a.link.stop()
    assert not a.link.thread.is_alive()
    publish(broker.port, b"while away")
    publish(broker.port, b'{"state":"online"}', topic="ttcs/dev/d1/status", retain=True)
    b = Link(broker.port, protocol)  # the same client id: the broker's session for it
    assert b.next() == (TOPIC, b"while away", False)
    assert b.threads == {"relay-mqtt"}  # called on the link's own thread
    b.link.subscribe([("ttcs/dev/+/status", 1)])  # from this thread: a retained message
    assert b.next() == ("ttcs/dev/d1/status", b'{"state":"online"}', True)
    b.link.unsubscribe([TOPIC])
    wait_until(lambda: "Received UNSUBSCRIBE from relay-test" in broker.log(), 10,
               what="UNSUBSCRIBE at the broker")
    publish(broker.port, b"not any more")
    with pytest.raises(queue.Empty):
        b.next(timeout=1)
    b.link.stop()


def test_every_message_is_acknowledged_so_none_comes_again(broker):
    """The PUBACKs of what one read brought go out together (ctl/relaylink.py): still one
    for every message, so a session taken up again holds nothing more."""
    a = Link(broker.port, "3.1.1")
    wait_until(a.subscribed, 15, what="relay link subscribed")
    a.link.stop()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub-many")
    c.max_inflight_messages_set(500)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    for info in [c.publish(TOPIC, b"%d" % i, qos=1) for i in range(500)]:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()
    b = Link(broker.port, "3.1.1")
    assert [b.next()[1] for _ in range(500)] == [b"%d" % i for i in range(500)]
    b.link.stop()
    again = Link(broker.port, "3.1.1")  # the same session: anything unacknowledged comes first
    wait_until(again.link.connected.is_set, 15, what="the session taken up again")
    publish(broker.port, b"last")
    assert again.next()[1] == b"last"  # and nothing of the 500 before it
    again.link.stop()


def test_it_waits_for_the_broker_and_reconnects_after_a_restart(tmp_path):
    port = free_port()
    a = Link(port)  # nothing listens yet: it keeps trying
    wait_until(lambda: a.link.thread.is_alive(), 5)
    assert not a.link.connected.wait(1.0)
    broker = Broker(tmp_path / "b", port=port).start()
    try:
        wait_until(a.subscribed, 20, what="connected once the broker is up")
        assert a.link.connects == 1
        broker.stop()  # no persistence: the session and its subscriptions are gone
        wait_until(lambda: not a.link.connected.is_set(), 10, what="the loss noticed")
        broker = Broker(tmp_path / "b", port=port).start()
        wait_until(a.subscribed, 30, what="connected and subscribed again")
        assert a.link.connects == 2
        publish(port, b"after the restart")
        assert a.next()[1] == b"after the restart"
    finally:
        a.link.stop()
        broker.stop()


def test_calls_while_disconnected_are_skipped_not_raised(tmp_path, caplog):
    port = free_port()
    a = Link(port)
    a.link.publish("ttcs/grp/all/cmd", b"{}")  # no broker: logged and dropped
    a.link.subscribe([("x/#", 1)])
    wait_until(lambda: sum("not connected;" in r.getMessage() for r in caplog.records) == 2,
               5, what="both calls logged as skipped")
    a.link.stop()
    assert not a.link.thread.is_alive()
    a.link.publish("ttcs/grp/all/cmd", b"{}")  # after the stop: nothing happens
