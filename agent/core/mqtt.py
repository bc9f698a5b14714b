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


CONNECT_TIMEOUT_S = 10.0  # default of mqtt.connect_timeout_s: TCP, TLS, and the CONNACK
PROTOCOL_REFUSED = 0x84  # CONNACK: unsupported protocol version (paho maps 3.1.1's 1 to it)
SILENT_ATTEMPTS_BEFORE_FALLBACK = 2  # unanswered MQTT 5 CONNECTs in a row that mean "not 5"


@dataclass
class LinkHandlers:
    on_connect: Callable[[bool], None]  # session_present
    on_disconnect: Callable[[str], None]  # reason
    on_message: Callable[..., None]  # topic, payload, retain, mid, qos, generation
    on_publish: Callable[[int], None]  # mid acknowledged by the broker
    # an attempt to connect failed, or the link's situation changed (connector thread)
    on_trouble: Callable[[], None] = lambda: None


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


def tls_files_error(tls: dict, e: OSError) -> TlsFilesError:
    """Loading the ``mqtt.tls`` files failed: an error naming them (OpenSSL's names none)."""
    files = ", ".join(f"{k} {v}" for k, v in tls.items() if v)
    return TlsFilesError(f"mqtt.tls: cannot load {files}: {e.strerror or e}")


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
                manual_ack: bool = False, protocol: str | None = None) -> mqtt.Client:
    """A configured paho client (protocol, TLS, credentials) — shared by agent and ttcs-ctl.
    ``persistent``: an MQTT 3.1.1 session the broker keeps (MQTT 5 chooses at connect).
    ``protocol`` ("5" or "3.1.1") overrides ``mqtt.protocol``."""
    v5 = str(protocol or mqtt_cfg.get("protocol", "5")) == "5"
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else not persistent,
        manual_ack=manual_ack,
    )
    client.connect_timeout = float(mqtt_cfg.get("connect_timeout_s", CONNECT_TIMEOUT_S))
    tls = mqtt_cfg.get("tls")
    if tls and tls.get("key_file"):
        check_private(tls["key_file"])
    if tls:
        try:
            client.tls_set(ca_certs=tls.get("ca_file"), certfile=tls.get("cert_file"),
                           keyfile=tls.get("key_file"), cert_reqs=ssl.CERT_REQUIRED)
        except OSError as e:  # ssl.SSLError too; OpenSSL's own message names no file
            raise tls_files_error(tls, e) from e
    if mqtt_cfg.get("username"):
        password = read_secret(mqtt_cfg["password_file"]) if mqtt_cfg.get("password_file") else None
        client.username_pw_set(mqtt_cfg["username"], password)
    return client


@dataclass
class Probe:
    """What one connection attempt per MQTT version found (``ttcs-agent doctor``)."""

    protocol: str | None  # the version the broker accepted; None: neither
    refused_5: str | None = None  # why MQTT 5 was not accepted, when 3.1.1 was then tried
    error: str | None = None  # why no version was accepted


def probe(mqtt_cfg: dict, client_id: str, timeout: float) -> Probe:
    """Connect (a clean session, no will) and disconnect, with MQTT 5 and, when the broker does
    not accept it, 3.1.1 — as the link would. ``client_id`` must not be the device's own (the
    broker would drop the running agent's connection)."""
    versions = ["5", "3.1.1"] if str(mqtt_cfg.get("protocol", "5")) == "5" else ["3.1.1"]
    errors: list[str] = []
    for version in versions:
        error = _try_connect(mqtt_cfg, client_id, version, timeout)
        if error is None:
            return Probe(version, errors[0] if errors else None)
        errors.append(error)
    return Probe(None, error=errors[0])


def _try_connect(mqtt_cfg: dict, client_id: str, version: str, timeout: float) -> str | None:
    try:
        client = make_client({**mqtt_cfg, "connect_timeout_s": timeout}, client_id,
                             persistent=False, protocol=version)
    except OSError as e:  # a key or password file this user cannot read, TLS files
        return f"cannot set up the connection: {e}"
    answers: list = []
    client.on_connect = lambda c, userdata, flags, reason_code, props: answers.append(reason_code)
    try:
        client.connect(mqtt_cfg["host"], int(mqtt_cfg["port"]), keepalive=60)
        deadline = time.monotonic() + timeout
        while not answers and time.monotonic() < deadline:
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS and not answers:
                return f"the broker closed the MQTT {version} connection without answering"
        if not answers:
            return f"no answer to the MQTT {version} CONNECT within {timeout:g} s"
        if answers[0].is_failure:
            return f"the broker refused MQTT {version}: {answers[0]}"
        return None
    except (OSError, ValueError) as e:  # ssl.SSLError and timeouts are OSErrors
        return f"connect failed: {e}"
    finally:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 - never connected, or gone already
            pass


class MqttLink:
    def __init__(self, mqtt_cfg: dict, client_id: str, handlers: LinkHandlers,
                 will: Callable[[], tuple[str, bytes]], cmd_topics: list[str],
                 doc_topics: list[str]) -> None:
        self.cfg = mqtt_cfg
        self.client_id = client_id
        self.handlers = handlers
        self.will = will
        self.cmd_topics = cmd_topics
        self.doc_topics = doc_topics
        # The MQTT version of the current (or last) attempt. Configured "5", the link falls back
        # to "3.1.1" by itself when the broker refuses 5 (see _attempt_failed); "fallback" says
        # why, and the fallback holds for the life of the process once 3.1.1 connected.
        self.protocol = "5" if str(mqtt_cfg.get("protocol", "5")) == "5" else "3.1.1"
        self.fallback: str | None = None
        self._fallback_held = False
        self._silent_v5 = 0  # MQTT 5 attempts in a row that got no CONNACK at all
        self.client = self._make_client()
        self.generation = 0  # increases at every connection; acks only go to their own
        self.connected = False
        self.reconnects = 0
        self.last_error: str | None = None
        self._connack_timeout = float(mqtt_cfg.get("connect_timeout_s", CONNECT_TIMEOUT_S))
        self._connack_due = 0.0  # monotonic: the attempt fails if no CONNACK came by then
        self._connack = False  # a CONNACK came in this attempt
        self._failure: str | None = None  # why this attempt failed, when the link knows best
        self._protocol_refused = False
        self._stop = threading.Event()
        self._need = threading.Event()  # set: the connector thread should (re)connect
        self._attached = False  # the owner thread is serving the socket
        self.waker: Callable[[], None] = lambda: None  # set by the owner: wakes its poll
        self._thread: threading.Thread | None = None

    def _make_client(self) -> mqtt.Client:
        # Inbound QoS 1 messages are acknowledged by the core once their effects are stored.
        client = make_client(self.cfg, self.client_id, manual_ack=True, protocol=self.protocol)
        client.max_inflight_messages_set(int(self.cfg.get("inflight", 20)))
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

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
                    self._connack_due = time.monotonic() + self._connack_timeout
                    self._attached = True
                    self.waker()
                    self._need.wait()
            except Exception as e:  # the link must outlive any bug or surprise
                log.exception("mqtt: connector thread error")
                self.last_error = f"connector error: {e}"
            if self._stop.is_set():
                break
            self.handlers.on_trouble()
            if time.monotonic() - started > 60:
                attempt = 0  # a long session: start the backoff afresh
            delay = backoff_delay(attempt, float(self.cfg.get("reconnect_min_s", 1)),
                                  float(self.cfg.get("reconnect_max_s", 30)))
            attempt += 1
            log.info("mqtt: reconnecting in %.1f s (%s)", delay, self.last_error)
            self._stop.wait(delay)

    def _connect(self) -> bool:
        self._connack, self._failure, self._protocol_refused = False, None, False
        if self._next_protocol() != self.protocol:
            self.protocol = self._next_protocol()
            self.client = self._make_client()  # detached: no other thread uses it now
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
            # paho closed it (a write failed while publishing; a refused connection: then
            # _detach reports the refusal)
            self._detach("connection closed")
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
        if not self.connected and time.monotonic() > self._connack_due and not self._connack:
            self._give_up_waiting()
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
        if not self.connected:
            reason = self._failure or reason
            self._attempt_failed(reason)
        self._lost(reason)
        self._need.set()

    # --- falling back to MQTT 3.1.1 --------------------------------------------------------

    def _attempt_failed(self, reason: str) -> None:
        """An attempt reached the broker (TCP, TLS, CONNECT sent) but no connection came of it.
        Configured 5: a broker that refuses the version, or twice in a row answers nothing (a
        3.1.1-only broker may wait for bytes it misreads), is tried with 3.1.1 next. If 3.1.1
        fares no better before it ever connected, the trouble was not the version: back to 5."""
        if self._fallback_held or str(self.cfg.get("protocol", "5")) != "5":
            return
        if self.protocol == "5":
            self._silent_v5 = 0 if self._connack else self._silent_v5 + 1
            if self._protocol_refused or self._silent_v5 >= SILENT_ATTEMPTS_BEFORE_FALLBACK:
                self.fallback = reason if self._protocol_refused else (
                    f"{self._silent_v5} MQTT 5 CONNECTs in a row got no answer within "
                    f"{self._connack_timeout:g} s")
                log.info("mqtt: %s:%s did not accept MQTT 5 (%s); trying MQTT 3.1.1",
                         self.cfg["host"], self.cfg["port"], self.fallback)
        elif self.fallback is not None:
            log.info("mqtt: MQTT 3.1.1 did not connect either (%s); trying MQTT 5 again", reason)
            self.fallback, self._silent_v5 = None, 0

    def _next_protocol(self) -> str:
        configured = str(self.cfg.get("protocol", "5"))
        return "3.1.1" if configured != "5" or self.fallback is not None else "5"

    def _give_up_waiting(self) -> None:
        """No CONNACK in time: the broker accepted TCP (and TLS) but does not answer CONNECT."""
        self._failure = (f"no answer to the MQTT {self.protocol} CONNECT within "
                         f"{self._connack_timeout:g} s")
        log.warning("mqtt: %s:%s: %s", self.cfg["host"], self.cfg["port"], self._failure)
        try:
            self.client.disconnect()  # closes the socket; its callback detaches
        except Exception:  # noqa: BLE001 - the socket may be gone already
            pass
        self._detach(self._failure)  # if the callback did not

    def _lost(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        self.last_error = reason
        if was:
            self.handlers.on_disconnect(reason)

    # --- paho callbacks (owner thread, inside poll) -----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = True
        if reason_code.is_failure:
            self._failure = f"broker refused the connection: {reason_code}"
            self._protocol_refused = self.v5 and reason_code.value == PROTOCOL_REFUSED
            log.warning("mqtt: %s", self._failure)
            client.disconnect()  # its callback detaches, with the refusal as the reason
            return
        if self.fallback is not None and not self._fallback_held:
            self._fallback_held = True
            log.warning("mqtt: connected with MQTT 3.1.1, kept until the agent restarts: the "
                        "broker did not accept MQTT 5 (%s). With 3.1.1 a command published "
                        "retained while the device was away cannot be told from a live one "
                        "(docs/PROTOCOL.md); set mqtt.protocol: \"3.1.1\" to skip trying 5",
                        self.fallback)
        self.connected = True
        self._silent_v5 = 0
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
