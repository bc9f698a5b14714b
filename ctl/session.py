"""A short-lived MQTT connection for ``ttcs-ctl`` commands (send, watch, push), and the exit
statuses the commands share."""

from __future__ import annotations

import queue
import secrets

from agent.core.mqtt import make_client, no_delay

EXIT_DONE, EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE = 0, 1, 2, 64


class Session:
    """A short-lived controller connection: messages arrive on a queue."""

    def __init__(self, cfg: dict, subscriptions: list[str]) -> None:
        self.cfg = cfg
        self.messages: queue.Queue = queue.Queue()
        self.client = make_client(cfg["mqtt"], f"ttcs-ctl-{secrets.token_hex(4)}",
                                  persistent=False)
        self._subscribed = queue.Queue()
        self.subscriptions = subscriptions
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.put(True)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload),
                                                                    bool(m.retain)))

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._subscribed.put(f"broker refused: {reason_code}")
            return
        client.subscribe([(t, 1) for t in self.subscriptions])

    def open(self, timeout: float = 10.0) -> None:
        m = self.cfg["mqtt"]
        self.client.connect(m["host"], int(m["port"]), keepalive=int(m["keepalive_s"]))
        no_delay(self.client)
        self.client.loop_start()
        try:
            ok = self._subscribed.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from the broker at {m['host']}:{m['port']}") from None
        if ok is not True:
            raise ConnectionError(ok)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

