"""A broker that speaks only MQTT 3.1.1 (amqtt, a real one on a free port): the agent on its
default MQTT 5 used to wait silently — no log line for 60 s, ``status`` saying DISCONNECTED
(None), ``doctor`` saying 0 problems. It now falls back to 3.1.1 by itself and says so."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent import doctor
from agent.core.mqtt import LinkHandlers, MqttLink
from tests.conftest import ROOT, Broker, Watcher, agent_config, wait_online, wait_until

DEV = "krongpa-phutuc-c03"


class Amqtt(Broker):
    """An amqtt broker (MQTT 3.1.1 only) on a free loopback port, stopped by PID."""

    def start(self) -> Amqtt:
        pytest.importorskip("amqtt")
        conf = self.folder / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n")
        with open(self.folder / "amqtt.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from amqtt.scripts.broker_script import "
                 "main; sys.argv = ['amqtt', '-c', sys.argv[1]]; main()", str(conf)],
                stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self._listening, 30, what=f"amqtt on port {self.port}")
        return self

    def log(self) -> str:  # written from start() on
        return (self.folder / "amqtt.log").read_text(errors="replace")


@pytest.fixture
def amqtt(tmp_path):
    broker = Amqtt(tmp_path / "amqtt").start()
    yield broker
    broker.stop()


def test_the_agent_falls_back_to_311_and_says_so(amqtt, keys, tmp_path, agent_factory):
    watcher = Watcher(amqtt.port, ["ttcs/#"], protocol_version=mqtt.MQTTv311)
    try:
        cfg = agent_config(tmp_path, amqtt.port, keys, mqtt={"connect_timeout_s": 1})
        agent = agent_factory(cfg)
        wait_online(watcher, DEV, timeout=30)
        env = keys.command(f"dev/{DEV}", "ping")
        watcher.publish(f"ttcs/dev/{DEV}/cmd", env)
        watcher.wait_ack(env["id"], "done")
        log = agent.log()
        assert "no answer to the MQTT 5 CONNECT within 1 s" in log
        assert log.count("connected with MQTT 3.1.1, kept until the agent restarts") == 1

        status = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert (f"broker:   127.0.0.1:{amqtt.port} connected, MQTT 3.1.1 (fell back from 5: "
                "2 MQTT 5 CONNECTs in a row got no answer within 1 s)") in status.stdout

        out = io.StringIO()
        assert doctor.main(str(cfg), out) == 0  # warnings, not failures
        text = out.getvalue()
        assert (f"WARN broker: 127.0.0.1:{amqtt.port} does not accept MQTT 5 (the broker "
                "refused MQTT 5: Unsupported protocol version); MQTT 3.1.1 works") in text
        assert "WARN agent: running" in text and "connected, MQTT 3.1.1 (fell back" in text
    finally:
        watcher.close()


def test_status_says_why_the_agent_is_not_connected(tmp_path, keys, agent_factory):
    """A broker that accepts TCP and never answers (MQTT 5 or 3.1.1): each attempt is logged
    and status.json says why, instead of DISCONNECTED (None)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        cfg = agent_config(tmp_path, silent.getsockname()[1], keys,
                           mqtt={"connect_timeout_s": 1})
        agent = agent_factory(cfg)

        def said() -> str | None:
            out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                                 cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
            return out if "DISCONNECTED: no answer to the MQTT" in out else None

        assert wait_until(said, 30, interval=0.5, what="status with the reason")
        # 3.1.1 got no answer either: not the version's fault, so MQTT 5 is tried again
        wait_until(lambda: "MQTT 3.1.1 did not connect either" in agent.log(), 30,
                   what="back to MQTT 5")
        assert "no answer to the MQTT 5 CONNECT within 1 s" in agent.log()
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        silent.close()


def _link(protocol: str = "5") -> MqttLink:
    handlers = LinkHandlers(on_connect=lambda sp: None, on_disconnect=lambda reason: None,
                            on_message=lambda *m: None, on_publish=lambda mid: None)
    return MqttLink({"host": "127.0.0.1", "port": 1, "protocol": protocol}, "unit", handlers,
                    will=lambda: ("t/s", b"off"), cmd_topics=[], doc_topics=[])


def _refused(link: MqttLink, name: str) -> None:
    """What the link sees of a broker that answers CONNECT with a refusal."""
    link._attached = True
    link._connack, link._failure, link._protocol_refused = False, None, False
    link._on_connect(link.client, None, None, ReasonCode(PacketTypes.CONNACK, aName=name), None)
    link._detach("disconnected")


def test_an_explicit_refusal_of_mqtt_5_falls_back_at_once():
    link = _link()
    _refused(link, "Unsupported protocol version")
    assert link.fallback == "broker refused the connection: Unsupported protocol version"
    assert link._next_protocol() == "3.1.1"
    assert link.last_error == link.fallback  # the refusal, not "disconnected"


def test_other_refusals_do_not_change_the_version():
    link = _link()
    _refused(link, "Not authorized")
    assert link.fallback is None and link._next_protocol() == "5"
    assert link.last_error == "broker refused the connection: Not authorized"
    pinned = _link("3.1.1")
    assert pinned.protocol == "3.1.1" and pinned._next_protocol() == "3.1.1"


def test_reconnects_after_the_fallback_keep_311(amqtt):
    """Once 3.1.1 connected, a lost connection reconnects with 3.1.1 (no new MQTT 5 wait)."""
    events: list[str] = []
    handlers = LinkHandlers(on_connect=lambda sp: events.append("up"),
                            on_disconnect=lambda reason: events.append("down"),
                            on_message=lambda *m: None, on_publish=lambda mid: None)
    link = MqttLink({"host": "127.0.0.1", "port": amqtt.port, "connect_timeout_s": 1,
                     "reconnect_min_s": 0.1, "reconnect_max_s": 0.2}, "fallback-unit", handlers,
                    will=lambda: ("t/s", b"off"), cmd_topics=["t/cmd"], doc_topics=[])
    stop = threading.Event()
    calls: list = []

    def serve() -> None:
        link.start()
        while not stop.is_set():
            link.poll(0.02)
            while calls:
                calls.pop(0)()
        link.stop()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: link.connected, 30, what="connected")
        assert link.protocol == "3.1.1" and link.fallback
        started = time.monotonic()
        calls.append(link.client._sock_close)  # the connection drops
        wait_until(lambda: events.count("up") == 2, 10, what="reconnected")
        assert time.monotonic() - started < 1.0  # no MQTT 5 attempt (1 s each) on the way
        assert link.protocol == "3.1.1"
    finally:
        stop.set()
        thread.join(10)


def _queued_for_offline_client(port: int) -> list[bytes]:
    """A persistent 3.1.1 session subscribes and goes away; a QoS 1 message is published; what
    the session gets when it comes back (what DEPLOY.md's broker table says)."""
    from paho.mqtt.enums import CallbackAPIVersion

    def session() -> tuple[mqtt.Client, list[bytes]]:
        got: list[bytes] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="queue-probe",
                             protocol=mqtt.MQTTv311, clean_session=False)
        client.on_message = lambda c, u, msg: got.append(bytes(msg.payload))
        client.connect("127.0.0.1", port)
        client.loop_start()
        wait_until(client.is_connected, 10, what="connected")
        return client, got

    client, _ = session()
    client.subscribe("ttcs/dev/queue-probe/cmd", 1)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    publisher = Watcher(port, ["none/#"], protocol_version=mqtt.MQTTv311)
    publisher.publish("ttcs/dev/queue-probe/cmd", b"hello")
    publisher.close()
    client, got = session()
    time.sleep(1.5)
    client.disconnect()
    client.loop_stop()
    return got


def test_mosquitto_keeps_a_command_for_an_offline_device_and_amqtt_does_not(broker, amqtt):
    assert _queued_for_offline_client(broker.port) == [b"hello"]
    assert _queued_for_offline_client(amqtt.port) == []
