"""In-process doubles for driving the core without a broker (the broker tests use mosquitto)."""

from __future__ import annotations

import json
import os
import select
from pathlib import Path

from agent import config
from agent.core.clock import ClockTrust, FakeClock
from agent.core.loop import Core
from agent.core.store import Store


class FakeLink:
    """Implements the MqttLink surface the core uses; records what was published."""

    def __init__(self, cfg, client_id, handlers, will, cmd_topics, doc_topics) -> None:
        self.handlers = handlers
        self.will = will
        self.cmd_topics = cmd_topics
        self.doc_topics = doc_topics
        self.connected = False
        self.reconnects = 0
        self.last_error = None
        self.protocol = "5"
        self.fallback = None
        self.published: list[tuple[str, bytes, int, bool, int]] = []
        self._mid = 0
        self.auto_ack = True
        self.acked: list[int] = []
        self.waker = lambda: None

    def start(self) -> None:
        pass

    def poll(self, timeout: float, wake_fd: int | None = None) -> bool:
        fds = [] if wake_fd is None else [wake_fd]
        return bool(select.select(fds, [], [], timeout)[0])

    def stop(self) -> None:
        self.connected = False

    def connect(self) -> None:
        self.connected = True
        self.reconnects += 1
        self.handlers.on_connect(False)

    def drop(self) -> None:
        self.connected = False
        self.handlers.on_disconnect("test")

    def publish(self, topic, payload, qos=1, retain=False):
        if not self.connected:
            return None
        self._mid += 1
        self.published.append((topic, payload, qos, retain, self._mid))
        if self.auto_ack:
            self.handlers.on_publish(self._mid)
        return self._mid

    def ack(self, mid, qos, generation) -> None:
        self.acked.append(mid)

    def publish_wait(self, topic, payload, timeout=2.0):
        return self.publish(topic, payload, 1, True) is not None

    def json(self, suffix: str) -> list[dict]:
        return [json.loads(p) for t, p, *_ in self.published if t.endswith(suffix)]


def make_core(tmp_path: Path, *, trusted_keys: dict | None = None, clock: FakeClock | None = None,
              trust: str = "always", extra: dict | None = None) -> Core:
    cfg_dict = {
        "device": {"id": "dev-1", "groups": ["g1"]},
        "security": {"trusted_keys": trusted_keys or {}},
        "paths": {"state_dir": str(tmp_path / "state"), "cache_dir": str(tmp_path / "cache")},
        "audio": {"backend": "sim"}, "gpio": {"backend": "sim"},
        "clock": {"trust": trust}, "state": {"min_interval_s": 0},
    }
    for k, v in (extra or {}).items():
        cfg_dict.setdefault(k, {}).update(v)
    import yaml

    cfg = config.parse(yaml.safe_dump(cfg_dict))
    os.makedirs(cfg["paths"]["state_dir"], exist_ok=True)
    store = Store(os.path.join(cfg["paths"]["state_dir"], "agent.db"),
                  max_rows=cfg["outbox"]["max_rows"], seen_max=cfg["security"]["replay_memory"])
    return Core(cfg, clock=clock or FakeClock(), store=store, trust=ClockTrust(trust),
                link_factory=FakeLink)
