"""The agent as a process against a real mosquitto: the contract seen from outside."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from agent import protocol
from tests.conftest import ROOT, Broker, Watcher, agent_config, wait_online, wait_until

DEV = "krongpa-phutuc-c03"
CMD = f"ttcs/dev/{DEV}/cmd"


@pytest.fixture
def watcher(broker):
    w = Watcher(broker.port, ["ttcs/#"])
    yield w
    w.close()


@pytest.fixture
def agent(broker, keys, tmp_path, agent_factory, watcher):
    a = agent_factory(agent_config(tmp_path, broker.port, keys))
    wait_online(watcher, DEV)
    return a


def test_online_status_state_and_ping(agent, watcher, keys):
    status = wait_online(watcher, DEV)
    assert status["v"] == 1 and status["session"] == 1 and isinstance(status["ts"], int)
    env = keys.command(f"dev/{DEV}", "ping")
    watcher.publish(CMD, env)
    watcher.wait_ack(env["id"], "done")
    assert [a["stage"] for a in watcher.acks(env["id"])] == ["received", "done"]
    state = wait_until(lambda: watcher.json(f"dev/{DEV}/state"), what="state")[-1]
    assert state["device"] == DEV and state["session"] == 1 and state["clock"]["trusted"] is True


def test_rejections_over_the_broker(agent, watcher, keys):
    now = int(time.time() * 1000)
    cases = {
        "too_large": b'{"v":1,"pad":"' + b"x" * 70_000 + b'"}',
        "bad_json": b"\xff not json",
        "unsigned": protocol.canonical(keys.command(f"dev/{DEV}", "ping", sign=False, cmd_id="u-1")),
        "wrong_target": protocol.canonical(keys.command("dev/someone-else", "ping", cmd_id="w-1")),
        "expired": protocol.canonical(keys.command(f"dev/{DEV}", "ping", exp=now - 1000, cmd_id="e-1")),
        "unsupported_type": protocol.canonical(keys.command(f"dev/{DEV}", "selfdestruct", cmd_id="t-1")),
    }
    forged = keys.command(f"dev/{DEV}", "ping", cmd_id="f-1")
    forged["args"] = {"sneaky": 1}
    cases["bad_signature"] = protocol.canonical(forged)
    for reason, payload in cases.items():
        watcher.publish(CMD, payload)
        wait_until(lambda r=reason: any(a.get("reason") == r for a in watcher.acks()),
                   what=f"rejected {reason}")
    assert agent.alive()
    rejected = [a for a in watcher.acks() if a["stage"] == "rejected"]
    assert {a["reason"] for a in rejected} == set(cases)
    assert all(a["id"] is None for a in rejected if a["reason"] in ("too_large", "bad_json"))


def test_retained_command_never_executes(broker, keys, tmp_path, agent_factory, watcher):
    env = keys.command(f"dev/{DEV}", "ping", cmd_id="ret-1")
    watcher.publish(CMD, env, retain=True)
    # MQTT 5 agent: retained commands are not even delivered (retain handling 2).
    agent_factory(agent_config(tmp_path, broker.port, keys))
    wait_online(watcher, DEV)
    time.sleep(1.0)
    assert watcher.acks("ret-1") == []
    # MQTT 3.1.1 agent on another device id subscribed to the same group topic gets it
    # retained and refuses it.
    env2 = keys.command("grp/krongpa", "ping", cmd_id="ret-2")
    watcher.publish("ttcs/grp/krongpa/cmd", env2, retain=True)
    agent_factory(agent_config(tmp_path, broker.port, keys, device="v311-dev", mqtt={"protocol": "3.1.1"}))
    ack = watcher.wait_ack("ret-2", "rejected", device="v311-dev")
    assert ack["reason"] == "retained_command"
    assert not any(a["stage"] == "done" for a in watcher.acks("ret-2", device="v311-dev"))
    # the MQTT 5 agent, already subscribed, got it live with its retain flag (retain as
    # published) and refused it too
    ack = watcher.wait_ack("ret-2", "rejected", device=DEV)
    assert ack["reason"] == "retained_command"
    assert [a["stage"] for a in watcher.acks("ret-2", device=DEV)] == ["rejected"]


def test_retained_command_queued_while_offline_is_refused(broker, keys, tmp_path, agent_factory,
                                                         watcher):
    """A command published retained while the agent is away waits in its persistent session;
    the broker used to deliver it at reconnect with the retain flag cleared, and it ran."""
    agent = agent_factory(agent_config(tmp_path, broker.port, keys))
    wait_online(watcher, DEV)
    assert agent.stop() == 0
    env = keys.command(f"dev/{DEV}", "ping", cmd_id="ret-offline")
    watcher.publish(CMD, env, retain=True)
    agent.start()
    ack = watcher.wait_ack("ret-offline", "rejected")
    assert ack["reason"] == "retained_command"
    time.sleep(0.5)
    assert [a["stage"] for a in watcher.acks("ret-offline")] == ["rejected"]  # nothing ran


def test_duplicate_delivery_executes_once_and_replay_after_restart(agent, watcher, keys):
    env = keys.command(f"dev/{DEV}", "ping", cmd_id="dup-1")
    watcher.publish(CMD, env)
    watcher.publish(CMD, env)
    wait_until(lambda: len(watcher.acks("dup-1")) >= 3, what="three acks")
    time.sleep(0.3)
    stages = [(a["stage"], a.get("reason")) for a in watcher.acks("dup-1")]
    assert stages == [("received", None), ("done", None), ("rejected", "replayed")]
    agent.stop()
    watcher.clear()
    agent.start()
    wait_online(watcher, DEV, session=2)
    watcher.publish(CMD, env)
    ack = watcher.wait_ack("dup-1", "rejected")
    assert ack["reason"] == "replayed"
    assert [a["stage"] for a in watcher.acks("dup-1")] == ["rejected"]


def test_clean_stop_publishes_shutdown_and_sigkill_leaves_the_will(agent, watcher):
    assert agent.stop() == 0
    off = wait_until(lambda: [s for s in watcher.json(f"dev/{DEV}/status") if s["state"] == "offline"],
                     what="offline")[-1]
    assert off["reason"] == "shutdown" and off["session"] == 1
    watcher.clear()
    agent.start()
    wait_online(watcher, DEV, session=2)
    agent.kill()
    lost = wait_until(lambda: [s for s in watcher.json(f"dev/{DEV}/status") if s["state"] == "offline"],
                      what="will")[-1]
    assert lost["reason"] == "lost" and lost["session"] == 2


def test_starts_without_broker_and_outbox_survives_outage_and_sigkill(tmp_path, keys, agent_factory):
    broker = Broker(tmp_path / "persistent-broker", persistence=True).start()
    w = Watcher(broker.port, ["ttcs/#"], persistent=True)  # the controller's persistent session
    broker.stop()
    try:
        a = agent_factory(agent_config(tmp_path, broker.port, keys))
        time.sleep(1.5)
        assert a.alive(), a.log()
        # events produced with no broker: config reloads (SIGHUP) are recorded as events
        a.signal(signal.SIGHUP)
        time.sleep(0.5)
        a.signal(signal.SIGHUP)
        time.sleep(0.5)
        a.kill()  # a power cut: the two stored events must survive
        a.start()
        time.sleep(1.0)
        a.signal(signal.SIGHUP)
        time.sleep(0.5)
        broker.start()
        # QoS 1 is at-least-once: a receiver deduplicates by seq, as the relay does.
        def by_seq():
            out = {}
            for e in w.json(f"dev/{DEV}/event"):
                out.setdefault(e["seq"], e)
            return out

        events = wait_until(lambda: by_seq() if len(by_seq()) >= 3 else None, 20, what="3 events")
        assert sorted(events) == [1, 2, 3]
        assert all(e["historical"] is True and e["type"] == "config" for e in events.values())
        wait_online(w, DEV, session=2)
        # an outage while connected: the event is queued, then delivered after reconnecting
        broker.stop()
        time.sleep(0.5)
        a.signal(signal.SIGHUP)
        time.sleep(0.3)
        broker.start()
        wait_until(lambda: 4 in by_seq(), 20, what="event after outage")
        assert by_seq()[4]["historical"] is True and sorted(by_seq()) == [1, 2, 3, 4]
    finally:
        w.close()
        broker.stop()


def test_invalid_reload_keeps_running_config(agent, watcher, keys, tmp_path):
    cfg_path = agent.config_path
    good = cfg_path.read_text()
    cfg_path.write_text(good + "bogus_section: 1\n")
    agent.signal(signal.SIGHUP)
    ev = wait_until(lambda: [e for e in watcher.json(f"dev/{DEV}/event") if e["type"] == "config"],
                    what="config event")[-1]
    assert ev["result"] == "rejected" and "bogus_section: unknown key" in ev["problems"][0]
    env = keys.command(f"dev/{DEV}", "ping")
    watcher.publish(CMD, env)
    watcher.wait_ack(env["id"], "done")


def test_reload_names_each_key_it_applied_and_each_that_needs_a_restart(agent, watcher):
    import yaml

    cfg = yaml.safe_load(agent.config_path.read_text())
    cfg["security"]["max_skew_s"] = 120
    cfg["mqtt"]["keepalive_s"] = 30
    agent.config_path.write_text(yaml.safe_dump(cfg))
    agent.signal(signal.SIGHUP)
    ev = wait_until(lambda: [e for e in watcher.json(f"dev/{DEV}/event") if e["type"] == "config"],
                    what="config event")[-1]
    assert ev["result"] == "applied"
    assert ev["applied"] == ["security.max_skew_s"]
    assert ev["restart_needed"] == ["mqtt.keepalive_s"]
    assert "restart needed for: mqtt.keepalive_s" in agent.log()


def test_state_command_republishes(agent, watcher, keys):
    wait_until(lambda: watcher.json(f"dev/{DEV}/state"), what="first state")
    watcher.clear()
    env = keys.command(f"dev/{DEV}", "state")
    watcher.publish(CMD, env)
    watcher.wait_ack(env["id"], "done")
    assert wait_until(lambda: watcher.json(f"dev/{DEV}/state"), what="state again")
    assert any(s["state"] == "online" for s in watcher.json(f"dev/{DEV}/status"))


def test_status_command_reads_running_agent(agent, tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(agent.config_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "running" in out.stdout and "connected" in out.stdout and DEV in out.stdout


def test_ctl_keygen_send_and_watch(broker, tmp_path, agent_factory, watcher):
    keyfile = tmp_path / "ctl" / "key.pem"
    gen = subprocess.run([sys.executable, "-m", "ctl", "keygen", "--out", str(keyfile)],
                         cwd=ROOT, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert (keyfile.stat().st_mode & 0o777) == 0o600
    pub = gen.stdout.strip().splitlines()[-1].split('"')[1]

    class K:
        kid, public_b64 = "district-ctl-1", pub

    agent_factory(agent_config(tmp_path, broker.port, K))
    wait_online(watcher, DEV)
    ctl_cfg = tmp_path / "ctl.yaml"
    ctl_cfg.write_text(f"mqtt: {{host: 127.0.0.1, port: {broker.port}}}\n"
                       f"signing: {{kid: district-ctl-1, key_file: {keyfile}}}\n")

    def ctl(*args, timeout=20):
        return subprocess.run([sys.executable, "-m", "ctl", "--config", str(ctl_cfg), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    ok = ctl("send", f"dev/{DEV}", "ping", "--timeout", "10")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "received" in ok.stdout and "done" in ok.stdout
    bad = ctl("send", f"dev/{DEV}", "ping", '{"x": 1}', "--timeout", "10")
    assert bad.returncode == 1 and "bad_args" in bad.stdout
    unsigned = ctl("send", f"dev/{DEV}", "ping", "--unsigned", "--timeout", "10")
    assert unsigned.returncode == 1 and "unsigned" in unsigned.stdout
    grp = ctl("send", "grp/krongpa", "ping", "--devices", "1", "--timeout", "10", "--json")
    assert grp.returncode == 0, grp.stdout + grp.stderr
    assert json.loads(grp.stdout.splitlines()[-1])["stage"] == "done"
    keyfile.chmod(0o644)
    loose = ctl("send", f"dev/{DEV}", "ping")
    assert loose.returncode == 1 and "chmod 600" in loose.stderr
    table = ctl("watch", "--once", "1.5")
    assert table.returncode == 0
    assert DEV in table.stdout and "online" in table.stdout


def test_fuzz_over_the_broker_keeps_agent_answering(agent, watcher, keys):
    import random

    rng = random.Random(7)
    topics = [CMD, "ttcs/grp/krongpa/cmd", "ttcs/grp/all/cmd", f"ttcs/dev/{DEV}/desired/schedule",
              f"ttcs/dev/{DEV}/desired/board"]
    for i in range(300):
        kind = rng.randrange(4)
        if kind == 0:
            payload = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            payload = json.dumps({"v": rng.choice([1, 2]), "id": f"z{i}", "type": rng.choice(["ping", "play", "x"]),
                                  "args": rng.choice([{}, [], {"a": i}])}).encode()
        elif kind == 2:
            payload = protocol.canonical(keys.command(f"dev/{DEV}", "ping", {"junk": i}))
        else:
            payload = b"[" * 5000
        watcher.publish(rng.choice(topics), payload, qos=rng.choice([0, 1]))
    env = keys.command(f"dev/{DEV}", "ping", cmd_id="after-fuzz")
    watcher.publish(CMD, env)
    watcher.wait_ack("after-fuzz", "done", timeout=20)
    assert agent.alive()


def test_mqtt_311_client_works(broker, keys, tmp_path, agent_factory):
    w = Watcher(broker.port, ["ttcs/#"], protocol_version=mqtt.MQTTv311)
    try:
        agent_factory(agent_config(tmp_path, broker.port, keys, mqtt={"protocol": "3.1.1"}))
        wait_online(w, DEV)
        env = keys.command(f"dev/{DEV}", "ping")
        w.publish(CMD, env)
        w.wait_ack(env["id"], "done")
    finally:
        w.close()


def test_two_threads_writing_to_the_link_keep_the_queue_order():
    """The core thread publishes while the network thread may be writing too: a packet taken
    off paho's queue must reach the socket before the next one is taken (an event overtaking
    the one before it was seen in the SIGKILL fault test)."""
    import threading

    from paho.mqtt.enums import CallbackAPIVersion

    from agent.core.mqtt import Client

    client = Client(CallbackAPIVersion.VERSION2, client_id="order")
    sent: list[bytes] = []
    first_taken, release = threading.Event(), threading.Event()

    def slow_first_send(data) -> int:  # the network thread, descheduled mid-send
        if not first_taken.is_set():
            first_taken.set()
            release.wait(5)
        sent.append(bytes(data))
        return len(data)

    def packet(mid: int) -> dict:  # a PUBACK: 0x40, length 2, mid
        return {"command": 0x40, "mid": mid, "qos": 0, "pos": 0, "to_process": 4,
                "packet": bytes([0x40, 2, 0, mid]), "info": None}

    client._sock = object()  # "connected"; the send itself is the stub
    client._sock_send = slow_first_send
    client._out_packet.append(packet(1))
    network = threading.Thread(target=client.loop_write)
    network.start()
    assert first_taken.wait(5)
    client._out_packet.append(packet(2))
    core = threading.Thread(target=client.loop_write)  # waits for the network thread's send
    core.start()
    time.sleep(0.2)
    release.set()
    network.join(5)
    core.join(5)
    client._sock = None  # nothing to close
    assert [p[3] for p in sent] == [1, 2]


class LinkOwner:
    """Drives an :class:`agent.core.mqtt.MqttLink` the way the core does: one thread polls it and
    publishes; the handlers record what the link reported."""

    def __init__(self, port: int) -> None:
        import threading

        from agent.core.mqtt import LinkHandlers, MqttLink

        self.events: list[str] = []
        self.calls: list = []  # run on the owner thread
        handlers = LinkHandlers(on_connect=lambda sp: self.events.append("up"),
                                on_disconnect=lambda reason: self.events.append("down"),
                                on_message=lambda *m: None, on_publish=lambda mid: None)
        self.link = MqttLink({"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.1,
                              "reconnect_max_s": 0.2}, "owner-test", handlers,
                             will=lambda: ("t/status", b"offline"), cmd_topics=["t/cmd"],
                             doc_topics=[])
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.link.start()
        while not self._stop.is_set():
            self.link.poll(0.02)
            while self.calls:
                self.calls.pop(0)()
        self.link.stop()

    def start(self) -> LinkOwner:
        self.thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)


def test_link_reconnects_when_paho_closed_the_socket_behind_its_back(broker):
    """A publish whose write fails makes paho close the socket from inside ``publish``; the
    owner's next poll must notice and have the connector thread connect again (before, the link
    kept waiting on a closed socket: no more commands after some broker restarts)."""
    owner = LinkOwner(broker.port).start()
    try:
        wait_until(lambda: owner.link.connected, 10, what="connected")
        owner.calls.append(owner.link.client._sock_close)  # as paho does on a failed write
        wait_until(lambda: owner.events.count("up") == 2, 10, what="reconnected")
        assert owner.events == ["up", "down", "up"]
        assert owner.link.reconnects == 2
        got = []
        owner.calls.append(lambda: got.append(owner.link.publish("t/x", b"1")))
        wait_until(lambda: got, 5, what="publish")
        assert isinstance(got[0], int)  # a message id: published on the new connection
    finally:
        owner.close()


def test_link_reconnects_after_the_broker_restarts(tmp_path):
    broker = Broker(tmp_path / "b").start()
    owner = LinkOwner(broker.port).start()
    try:
        wait_until(lambda: owner.link.connected, 10, what="connected")
        broker.stop()
        wait_until(lambda: not owner.link.connected, 10, what="loss noticed")
        broker.start()
        wait_until(lambda: owner.link.connected, 10, what="reconnected")
        assert owner.events == ["up", "down", "up"]
    finally:
        owner.close()
        broker.stop()


def test_a_publish_that_meets_a_dead_connection_arrives_once(broker):
    """The write fails (connection just lost): paho keeps the QoS 1 message and resends it after
    reconnecting, so publish() reports it taken. Before, it said "not sent" and the outbox
    stored a second copy (``historical``): an ack seen twice in the broker-restart fault test."""
    import socket as socketlib

    w = Watcher(broker.port, ["t/#"])
    owner = LinkOwner(broker.port).start()
    try:
        wait_until(lambda: owner.link.connected, 10, what="connected")
        got: list = []

        def publish_into_a_dead_socket() -> None:
            owner.link.client.socket().shutdown(socketlib.SHUT_RDWR)
            got.append(owner.link.publish("t/x", b"only-once"))

        owner.calls.append(publish_into_a_dead_socket)
        wait_until(lambda: got, 5, what="publish")
        assert isinstance(got[0], int), "paho kept the message: it is not for the caller to resend"
        wait_until(lambda: owner.link.reconnects == 2, 10, what="reconnected")
        wait_until(lambda: [p for t, p, _ in w.messages if t == "t/x"], 10, what="redelivery")
        time.sleep(0.5)
        assert [p for t, p, _ in w.messages if t == "t/x"] == [b"only-once"]
    finally:
        owner.close()
        w.close()


def test_stop_while_connecting_ends_the_connector_thread(broker):
    """stop() while the connector thread is inside connect(): before, the thread cleared the
    stop's wake-up after connecting and waited forever (shutdown then hung for its 5 s join)."""
    owner = LinkOwner(broker.port)
    link = owner.link
    real_connect = link._connect

    def connect_while_stopped() -> bool:
        ok = real_connect()
        link._stop.set()  # what stop() does from the core thread while not yet attached
        link._need.set()
        return ok

    link._connect = connect_while_stopped
    link.start()
    link._thread.join(3)
    assert not link._thread.is_alive()
    assert not link.connected
