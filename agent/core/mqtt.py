"""The MQTT link (paho-mqtt 2.x, VERSION2 callbacks), served by its owner's thread.

The owner (the core thread) calls :meth:`MqttLink.poll` in its loop: one ``select()`` on the
broker socket and the owner's wake-up pipe, then paho's ``loop_read``/``loop_write``/
``loop_misc``. So one thread reads and writes the socket (TLS included) and inbound commands
are handled where they were read. Connecting blocks (DNS, TCP, TLS, CONNECT), so it happens on a
connector thread, which hands the socket over and waits until it is lost. The link never gives
up: after any loss it waits a jittered exponential backoff (capped at
``mqtt.reconnect_max_s``) before trying again, so a fleet does not stampede a restarted broker.
The callbacks run inside ``poll`` and only hand events to the core.
"""
from __future__ import annotations

import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)


@dataclass
class LinkHandlers:
    on_connect: Callable[[bool], None]  # session_present
    on_disconnect: Callable[[str], None]  # reason
    on_message: Callable[..., None]  # topic, payload, retain, mid, qos, generation
    on_publish: Callable[[int], None]  # mid acknowledged by the broker


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random = random) -> float:
    """Exponential backoff with jitter: uniformly between half and all of min(cap, base*2^n)."""
    ceiling = min(cap, base * (2 ** min(attempt, 20)))
    return rng.uniform(ceiling / 2, ceiling)


def no_delay(client: mqtt.Client) -> None:
    """Send small packets (acks) at once: without TCP_NODELAY, Nagle's algorithm and the
    peer's delayed ACK add ~40 ms to back-to-back messages."""
    sock = client.socket()
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # not a TCP socket (e.g. wrapped or already closed)


class TlsFilesError(OSError):
    """The ``mqtt.tls`` files cannot be loaded; the message names them."""


def check_private(path: str) -> None:
    """Refuse a secret (private key, password file) that group or others can read."""
    import os
    import stat

    st = os.stat(path)
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by group or others; chmod 600 it")


def read_secret(path: str) -> str:
    """Read a password file, refusing one that others can read."""
    check_private(path)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


# publish() results for which paho still holds a QoS > 0 message and resends it after reconnecting
_KEPT_BY_PAHO = (mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_CONN_LOST)


class Client(mqtt.Client):
    """paho's client, with one writer to the socket at a time.

    Without ``loop_start()`` paho writes from the publishing thread itself, and its
    ``loop_write`` takes a packet off the queue and sends it without a lock: with two threads
    writing, one can take event N, the other N+1, and N+1 reach the broker first (seen when the
    agent had a network thread beside the core). The agent now writes from one thread at a time
    (the connector thread sends CONNECT, then the core thread everything else); the lock from
    taking to sending keeps the wire in queue order should two ever overlap.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.RLock()  # re-entered when a write triggers a callback

    def loop_write(self) -> mqtt.MQTTErrorCode:
        with self._write_lock:
            return super().loop_write()


def make_client(mqtt_cfg: dict, client_id: str, persistent: bool = True,
                manual_ack: bool = False) -> mqtt.Client:
    """A configured paho client (protocol, TLS, credentials) — shared by agent and ttcs-ctl.
    ``persistent``: an MQTT 3.1.1 session the broker keeps (MQTT 5 chooses at connect)."""
    v5 = str(mqtt_cfg.get("protocol", "5")) == "5"
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    tls = mqtt_cfg.get("tls")
    if tls and tls.get("key_file"):
        check_private(tls["key_file"])
    if tls:
        try:
            client.tls_set(ca_certs=tls.get("ca_file"), certfile=tls.get("cert_file"),
                           keyfile=tls.get("key_file"), cert_reqs=ssl.CERT_REQUIRED)
        except OSError as e:  # ssl.SSLError too; OpenSSL's own message names no file
            files = ", ".join(f"{k} {v}" for k, v in tls.items() if v)
            raise TlsFilesError(f"mqtt.tls: cannot load {files}: {e.strerror or e}") from e
    if mqtt_cfg.get("username"):
        password = read_secret(mqtt_cfg["password_file"]) if mqtt_cfg.get("password_file") else None
        client.username_pw_set(mqtt_cfg["username"], password)
    return client


class MqttLink:
    def __init__(self, mqtt_cfg: dict, client_id: str, handlers: LinkHandlers,
                 will: Callable[[], tuple[str, bytes]], cmd_topics: list[str],
                 doc_topics: list[str]) -> None:
        self.cfg = mqtt_cfg
        self.v5 = str(mqtt_cfg.get("protocol", "5")) == "5"
        self.handlers = handlers
        self.will = will
        self.cmd_topics = cmd_topics
        self.doc_topics = doc_topics
        # Inbound QoS 1 messages are acknowledged by the core once their effects are stored.
        self.client = make_client(mqtt_cfg, client_id, manual_ack=True)
        self.generation = 0  # increases at every connection; acks only go to their own
        self.client.max_inflight_messages_set(int(mqtt_cfg.get("inflight", 20)))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.connected = False
        self.reconnects = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._need = threading.Event()  # set: the connector thread should (re)connect
        self._attached = False  # the owner thread is serving the socket
        self.waker: Callable[[], None] = lambda: None  # set by the owner: wakes its poll
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the connector thread. The connection itself is served by :meth:`poll`."""
        self._thread = threading.Thread(target=self._run, name="mqtt-connect", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Disconnect (owner thread) and end the connector thread."""
        self._stop.set()
        self._need.set()
        if self._attached:
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._detach("stopped")
        if self._thread:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        """Connector thread: connect (blocking: DNS, TCP, TLS), hand the socket to the owner
        thread, wait until it is lost, back off, connect again."""
        attempt = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._need.clear()  # from here on only stop() or a detach sets it
                if self._connect():
                    if self._stop.is_set():  # stop() came while connecting
                        break
                    self._attached = True
                    self.waker()
                    self._need.wait()
            except Exception as e:  # the link must outlive any bug or surprise
                log.exception("mqtt: connector thread error")
                self.last_error = f"connector error: {e}"
            if self._stop.is_set():
                break
            if time.monotonic() - started > 60:
                attempt = 0  # a long session: start the backoff afresh
            delay = backoff_delay(attempt, float(self.cfg.get("reconnect_min_s", 1)),
                                  float(self.cfg.get("reconnect_max_s", 30)))
            attempt += 1
            log.info("mqtt: reconnecting in %.1f s (%s)", delay, self.last_error)
            self._stop.wait(delay)

    def _connect(self) -> bool:
        topic, payload = self.will()
        self.client.will_set(topic, payload, qos=1, retain=True)
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(self.cfg.get("session_expiry_s", 86400))
        try:
            self.client.connect(self.cfg["host"], int(self.cfg["port"]),
                                keepalive=int(self.cfg.get("keepalive_s", 60)),
                                clean_start=False if self.v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                properties=props)
            no_delay(self.client)
            return True
        except (TimeoutError, OSError, ssl.SSLError, ValueError) as e:
            self.last_error = f"connect to {self.cfg['host']}:{self.cfg['port']} failed: {e}"
            return False

    # --- serving the connection (owner thread) ----------------------------------------

    def poll(self, timeout: float, wake_fd: int | None = None) -> bool:
        """Wait up to ``timeout`` for the broker or ``wake_fd``, then read, write and keep
        the connection alive. Called only by the owner (the core thread), which is then the
        only thread that touches the socket: no locks, no thread hop for inbound messages.
        Returns whether ``wake_fd`` became readable."""
        sock = self.client.socket() if self._attached else None
        if self._attached and sock is None:
            # paho closed it (a write failed while publishing; a refused connection)
            self._detach(self.last_error or "connection closed")
        rlist: list = [] if wake_fd is None else [wake_fd]
        wlist: list = []
        pending = 0  # bytes TLS has already decrypted (select cannot see them)
        if sock is not None:
            rlist.append(sock)
            if self.client.want_write():
                wlist.append(sock)
            pending = getattr(sock, "pending", lambda: 0)()
            if pending > 0:
                timeout = 0.0
        try:
            readable, writable, _ = select.select(rlist, wlist, [], max(0.0, timeout))
        except (OSError, ValueError, TypeError):
            readable, writable = [], []
            if sock is not None:
                self._detach("socket error")
                return False
        woken = wake_fd is not None and wake_fd in readable
        if sock is None:
            return woken
        rc = mqtt.MQTT_ERR_SUCCESS
        if sock in readable or pending > 0:
            rc = self.client.loop_read()
        if rc == mqtt.MQTT_ERR_SUCCESS and (sock in writable or self.client.want_write()):
            rc = self.client.loop_write()
        if rc == mqtt.MQTT_ERR_SUCCESS:
            rc = self.client.loop_misc()
        if rc != mqtt.MQTT_ERR_SUCCESS or self.client.socket() is None:
            self._detach(f"connection lost ({mqtt.error_string(rc)})")
        return woken

    def _detach(self, reason: str) -> None:
        """The connection is gone: tell the core, and the connector thread to reconnect."""
        if not self._attached:
            return
        self._attached = False
        self._lost(reason)
        self._need.set()

    def _lost(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self.last_error = reason
        if was:
            self.handlers.on_disconnect(reason)

    # --- paho callbacks (owner thread, inside poll) -----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.last_error = f"broker refused the connection: {reason_code}"
            log.warning("mqtt: %s", self.last_error)
            client.disconnect()
            return
        self.connected = True
        self.reconnects += 1
        self.generation += 1
        self._subscribe()
        self.handlers.on_connect(bool(flags.session_present))

    def _subscribe(self) -> None:
        if self.v5:
            # Commands: a retained one is not sent at subscribe time (retain handling 2), and one
            # published retained while we were away, kept in our session, arrives with its retain
            # flag (retain as published; without it the broker clears the flag and the command
            # would run at reconnect): refused as retained_command.
            no_retained = SubscribeOptions(qos=1, retainAsPublished=True,
                                           retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
            subs = [(t, no_retained) for t in self.cmd_topics]
            subs += [(t, SubscribeOptions(qos=1)) for t in self.doc_topics]
        else:
            subs = [(t, 1) for t in self.cmd_topics + self.doc_topics]
        self.client.subscribe(subs)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._detach(f"disconnected: {reason_code}")

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        self.handlers.on_message(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid,
                                 msg.qos, self.generation)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.handlers.on_publish(mid)

    # --- publishing (owner thread) -------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Publish if connected; return the message id, or None when it was not taken.

        A QoS 1 message whose write finds the connection just lost is still taken: paho keeps
        it and sends it again after reconnecting, so the caller must not send a copy of its own
        (a stored copy would arrive as a second, ``historical`` message)."""
        if not self.connected:
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc in _KEPT_BY_PAHO):
            return info.mid
        return None

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge an inbound message received on the current connection. One received on
        an older connection is left unacknowledged: the broker delivers it again."""
        if self.connected and generation == self.generation:
            self.client.ack(mid, qos)

    def publish_wait(self, topic: str, payload: bytes, timeout: float = 2.0) -> bool:
        """Publish retained QoS 1 and serve the connection until the broker acknowledges it
        (owner thread, for shutdown)."""
        if not self.connected:
            return False
        info = self.client.publish(topic, payload, qos=1, retain=True)
        deadline = time.monotonic() + timeout
        while not info.is_published() and self._attached:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.poll(min(left, 0.1))
        return info.is_published()
