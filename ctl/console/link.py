"""The console's MQTT client: it publishes the signed commands and documents the users send,
follows the devices' acks of those commands (stored by :class:`~ctl.console.audit.Audit` and
shown live), and keeps the retained ``desired/schedule`` and ``desired/board`` documents of
every topic in memory, so the schedule and board pages show what is live and diff against it.

paho's network thread only enqueues; one worker thread stores acks (device data: hostile)."""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from typing import Any

from agent import protocol
from agent.core.mqtt import make_client
from ctl.sanitize import device_id, parse_object

log = logging.getLogger(__name__)

KNOWN_WINDOW_MS = 7 * 86_400_000  # acks of commands older than this are not followed


class Link:
    def __init__(self, cfg: dict, audit, hub) -> None:
        self.cfg = cfg
        self.audit = audit
        self.hub = hub
        self.prefix = cfg["mqtt"]["topic_prefix"]
        self.documents: dict[str, bytes] = {}  # topic -> retained payload
        self.connected = threading.Event()
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self._inbox: queue.Queue = queue.Queue(20_000)
        self.client = make_client(cfg["mqtt"], f"ttcs-console-{secrets.token_hex(4)}",
                                  persistent=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        self._worker = threading.Thread(target=self._run, name="console-acks", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._known = self.audit.known_commands(int(time.time() * 1000) - KNOWN_WINDOW_MS)
        m = self.cfg["mqtt"]
        self.client.reconnect_delay_set(1, 30)
        self.client.connect_async(m["host"], int(m["port"]), keepalive=int(m["keepalive_s"]))
        self.client.loop_start()
        self._worker.start()

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()
        self._inbox.put(None)
        self._worker.join(5)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("console: broker refused: %s", reason_code)
            return
        p = self.prefix
        # exactly the controller's ACL lines (docs/DEPLOY.md, "The console")
        client.subscribe([(f"{p}/dev/+/ack", 1)] + [(f"{p}/{kind}/+/desired/{doc}", 1)
                                                    for kind in ("dev", "grp")
                                                    for doc in ("schedule", "board")])
        self.connected.set()
        log.info("console connected to the broker")

    def _on_message(self, client, userdata, msg) -> None:  # paho's thread: only enqueue
        if "/desired/" in msg.topic:
            if msg.payload:
                self.documents[msg.topic] = bytes(msg.payload)
            else:
                self.documents.pop(msg.topic, None)
            return
        try:
            self._inbox.put_nowait((msg.topic, bytes(msg.payload)))
        except queue.Full:
            log.warning("console: ack queue full, dropped one from %s", msg.topic)

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            try:
                self._ack(*item)
            except Exception:  # one bad ack never stops the others
                log.exception("console: storing an ack failed")

    def _ack(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        device = device_id(parts[-2]) if len(parts) >= 3 else None
        ack = parse_object(payload)
        if device is None or ack is None or ack.get("stage") not in protocol.STAGES:
            return
        cmd_id = ack.get("id")
        with self._known_lock:
            if not isinstance(cmd_id, str) or cmd_id not in self._known:
                return
        now = int(time.time() * 1000)
        row, final = self.audit.ack(cmd_id, device, ack, now)
        self.hub.publish("ack", {"id": row, "cmd_id": cmd_id, "device": device,
                                 "stage": ack["stage"],
                                 "reason": ack.get("reason") if isinstance(ack.get("reason"),
                                                                           str) else None,
                                 "received_ms": now, "final": final})

    # --- sending -------------------------------------------------------------------------

    def follow(self, cmd_id: str) -> None:
        with self._known_lock:
            self._known.add(cmd_id)

    def publish(self, topic: str, payload: bytes, retain: bool = False,
                timeout: float = 10.0) -> None:
        """Publish QoS 1 and wait until the broker has it; ConnectionError otherwise."""
        if not self.connected.is_set():
            raise ConnectionError("the console is not connected to the broker")
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise ConnectionError("the broker did not confirm the message in time")

    def document(self, target: str, kind: str) -> Any:
        return self.documents.get(f"{self.prefix}/{target}/desired/{kind}")
