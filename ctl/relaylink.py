"""The relay's MQTT session: gmqtt on an asyncio loop of its own thread.

The relay receives every message the fleet sends, so its receive path is the district side's
hot loop. paho reads a packet in three or more ``recv`` calls and goes through ``select`` for
each; gmqtt parses what one read brings (asyncio's protocol buffers). Measured here on a
persistent session holding 40,000 messages (``scripts/bench/relay_ingest.py``,
docs/PERFORMANCE.md): paho 7,700 messages per CPU-second on MQTT 5 and 12,200 on 3.1.1, gmqtt
30,800 and 42,200. The devices and the short-lived ``ttcs-ctl`` commands keep paho
(:mod:`agent.core.mqtt`); this is only the relay's link.

What the relay needs of it, and what this class does:

- a persistent session (MQTT 5: clean start off, session expiry ``relay.session_expiry_s``;
  3.1.1: clean session off), so the broker keeps QoS 1 messages while the relay is away;
- ``mqtt.protocol``, TLS (``mqtt.tls``: CA, client certificate and key, the key refused if
  others can read it), a user and password file, ``mqtt.keepalive_s``,
  ``mqtt.connect_timeout_s``;
- the first connection retried with the agent's jittered backoff (``mqtt.reconnect_min_s`` …
  ``reconnect_max_s``) until it succeeds or the link is stopped; a lost connection is
  re-established by gmqtt every ``reconnect_min_s`` (it replays unacknowledged QoS 1
  publications when the session is present), and after a refusal gmqtt takes for permanent
  (bad credentials, not authorised) the link asks again every minute;
- ``on_message(topic, payload, retained)`` and ``on_connect()`` called on the link's thread (the
  relay only enqueues there: :class:`ctl.ingest.Writer`); a QoS 1 message is acknowledged
  when ``on_message`` returns;
- ``subscribe``, ``unsubscribe`` and ``publish`` callable from any thread;
- ``stop()``: DISCONNECT (the session stays with the broker), then the loop and thread end;
  no ``on_message`` call happens after it returns.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any

from agent.core.mqtt import backoff_delay, check_private, read_secret, tls_files_error

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86400  # what the broker keeps for the relay while it is away
STOP_TIMEOUT_S = 10.0
WATCH_S = 5.0  # how often the link looks whether it is connected
STALLED_S = 60.0  # not connected this long: a new attempt (gmqtt gave up after a refusal)


def tls_context(tls: dict) -> ssl.SSLContext:
    """``mqtt.tls`` as a client context: the CA (or the system's), the client certificate and
    key; the server's certificate and name are checked. A file that cannot be loaded is named
    (OpenSSL's own message names none)."""
    if tls.get("key_file"):
        check_private(tls["key_file"])
    try:
        ctx = ssl.create_default_context(cafile=tls.get("ca_file"))
        if tls.get("cert_file"):
            ctx.load_cert_chain(tls["cert_file"], tls.get("key_file"))
    except OSError as e:  # ssl.SSLError too
        raise tls_files_error(tls, e) from e
    return ctx


class RelayLink:
    """One persistent MQTT session served by an asyncio loop on its own thread."""

    def __init__(self, mqtt_cfg: dict, client_id: str, *,
                 on_message: Callable[[str, bytes, bool], None],
                 on_connect: Callable[[], None] = lambda: None,
                 session_expiry_s: int = SESSION_EXPIRY_S) -> None:
        self.cfg = mqtt_cfg
        self.on_message = on_message
        self.on_connect = on_connect
        self.v5 = str(mqtt_cfg.get("protocol", "5")) == "5"
        self.ssl = tls_context(mqtt_cfg["tls"]) if mqtt_cfg.get("tls") else False
        self.connected = threading.Event()
        self.connects = 0
        self.loop = asyncio.new_event_loop()
        self.client = _client_class()(client_id, clean_session=False,
                                   session_expiry_interval=int(session_expiry_s),
                                   logger=logging.getLogger("ctl.relaylink.gmqtt"))
        if mqtt_cfg.get("username"):
            password = read_secret(mqtt_cfg["password_file"]) \
                if mqtt_cfg.get("password_file") else None
            self.client.set_auth_credentials(mqtt_cfg["username"], password)
        self.client.set_config({"reconnect_retries": -1,
                                "reconnect_delay": float(mqtt_cfg.get("reconnect_min_s", 1))})
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._stopping: asyncio.Event | None = None
        self._main: asyncio.Task | None = None
        self.thread = threading.Thread(target=self._run, name="relay-mqtt", daemon=True)

    # --- from any thread ---------------------------------------------------------------

    def start(self) -> RelayLink:
        self.thread.start()
        return self

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        from gmqtt import Subscription

        subs = [Subscription(t, qos=q) for t, q in topics]
        self._call(f"SUBSCRIBE of {len(topics)} topic(s)", lambda: self.client.subscribe(subs))

    def unsubscribe(self, topics: list[str]) -> None:
        self._call(f"UNSUBSCRIBE of {len(topics)} topic(s)",
                   lambda: self.client.unsubscribe(list(topics)))

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._call(f"PUBLISH {topic}",
                   lambda: self.client.publish(topic, payload, qos=qos, retain=retain))

    def stop(self) -> None:
        """Disconnect cleanly (the broker keeps the session) and end the thread; idempotent."""
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self._ask_stop)
        self.thread.join(STOP_TIMEOUT_S + 5)

    # --- the link's thread -------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> None:
        """``fn`` on the link's thread, when connected (else logged: the relay's periodic
        steps ask again); after the stop, nothing."""
        def guarded() -> None:
            if not self.connected.is_set():
                log.warning("relay link: not connected; %s skipped", what)
                return
            try:
                fn()
            except Exception:  # a closed transport between connects: next tick retries
                log.exception("relay link: a call to the broker failed")
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(guarded)

    def _ask_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
            for task in asyncio.all_tasks(self.loop):  # gmqtt's reconnects, pings
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        attempt = 0
        while not self._stopping.is_set():  # the first connection
            try:
                await asyncio.wait_for(self._connect(), float(self.cfg.get(
                    "connect_timeout_s", 10)))
                break
            except (OSError, TimeoutError) as e:  # unreachable, TLS, no answer: again later
                # a half-open attempt is closed first (inactive: gmqtt does not reconnect
                # it), so that two connections never take turns on the client id
                await self._close()
                delay = backoff_delay(attempt, float(self.cfg.get("reconnect_min_s", 1)),
                                      float(self.cfg.get("reconnect_max_s", 30)))
                log.warning("relay link: cannot connect to %s:%s (%s); again in %.1f s",
                            self.cfg["host"], self.cfg["port"], e or type(e).__name__, delay)
                attempt += 1
                await self._sleep(delay)
        # from here gmqtt reconnects a lost connection itself, except after a refusal it
        # takes for permanent (bad credentials, not authorised): asked again every STALLED_S
        quiet = 0.0
        while not self._stopping.is_set():
            await self._sleep(WATCH_S)
            quiet = 0.0 if self.connected.is_set() else quiet + WATCH_S
            if quiet >= STALLED_S:
                quiet = 0.0
                log.warning("relay link: not connected for %d s; connecting again",
                            STALLED_S)
                try:
                    await self.client.reconnect()
                except OSError as e:
                    log.warning("relay link: reconnect failed: %s", e)
        self.connected.clear()
        await self._close()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self.client.disconnect(), STOP_TIMEOUT_S)
        except (OSError, TimeoutError, AttributeError) as e:  # not connected: nothing to close
            log.debug("relay link: disconnect: %s", e)

    async def _connect(self) -> None:
        """One attempt; a refusal gmqtt retries itself is not raised (raise_exc off)."""
        from gmqtt.mqtt.constants import MQTTv50, MQTTv311

        await self.client.connect(self.cfg["host"], int(self.cfg["port"]), ssl=self.ssl,
                                  keepalive=int(self.cfg.get("keepalive_s", 60)),
                                  version=MQTTv50 if self.v5 else MQTTv311, raise_exc=False)

    def _on_connect(self, client: Any, flags: int, rc: int, properties: Any) -> None:
        self.connects += 1
        self.connected.set()
        self.on_connect()

    def _on_disconnect(self, client: Any, packet: Any, exc: Any = None) -> None:
        if self.connected.is_set():
            log.warning("relay link: connection to the broker lost; reconnecting")
        self.connected.clear()

    def _on_message(self, client: Any, topic: str, payload: bytes, qos: int,
                    properties: dict) -> int:
        self.on_message(topic, payload, bool(properties.get("retain")))
        return 0  # PUBACK: success


def _client_class() -> type:
    """gmqtt's client with the PUBACKs of what one read brought sent in one write.

    gmqtt writes each PUBACK by itself: one ``send`` per message, half of the link thread's
    time in a profile, and as many wake-ups of the broker. Here they are gathered while the
    packets of one read are handled and written together right after (``call_soon``: before
    anything else the loop does, a stop included). Measured: one relay catching up on MQTT
    3.1.1 went from 5,309 to 8,899 msg/s (docs/PERFORMANCE.md). It overrides gmqtt's
    ``_send_command_with_mid`` (setup.py pins gmqtt 0.8.x; tests/test_relaylink.py checks
    that every message is acknowledged)."""
    import gmqtt
    from gmqtt.mqtt.constants import MQTTCommands
    from gmqtt.mqtt.package import CommandWithMidPacket

    class Client(gmqtt.Client):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._acks: list[bytes] = []

        def _send_command_with_mid(self, cmd: int, mid: int, dup: bool,
                                   reason_code: int = 0) -> None:
            if cmd != MQTTCommands.PUBACK:
                return super()._send_command_with_mid(cmd, mid, dup, reason_code)
            if not self._acks:
                asyncio.get_running_loop().call_soon(self._flush_acks, self._connection)
            self._acks.append(CommandWithMidPacket.build_package(
                cmd, mid, dup, reason_code, self._connection_state.protocol_version))
            return None

        def _flush_acks(self, connection: Any) -> None:
            acks, self._acks = self._acks, []
            if connection is self._connection:  # a lost connection's: the broker resends
                connection.send_package(b"".join(acks))

    return Client
