"""A TCP proxy on 127.0.0.1 for fault injection between an agent and its broker.

Every accepted connection is forwarded to ``upstream_port`` by two pump threads (one per
direction). Faults are controlled from the test thread at any moment:

- ``delay_s``: each chunk waits this long before it is forwarded (latency);
- ``rate_bps``: bytes per second per direction (throttle); 0 = unlimited;
- ``refuse``: new connections are accepted and closed at once (the broker "unreachable");
- :meth:`drop_all`: close every connection now (a link drop);
- :meth:`cut_mid_packet`: the next chunk in either direction is forwarded only in part, then
  the connection is closed (a packet cut in the middle).
"""

from __future__ import annotations

import socket
import threading
import time


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = 0.0
        self.rate_bps = 0
        self.refuse = False
        self.connections = 0
        self.cuts = 0
        self._cut_next = False
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(256)
        self.port = self._server.getsockname()[1]
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True).start()

    # --- control ---------------------------------------------------------------------------

    def drop_all(self) -> int:
        """Close every open connection; return how many were closed."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _close(a)
            _close(b)
        return len(pairs)

    def live_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut_mid_packet(self) -> None:
        """Forward only part of the next chunk (either way), then close that connection."""
        self._cut_next = True

    def clear_faults(self) -> None:
        self.delay_s = 0.0
        self.rate_bps = 0
        self.refuse = False
        self._cut_next = False

    def close(self) -> None:
        self._closed.set()
        _close(self._server)
        self.drop_all()

    # --- forwarding ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self.refuse:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                if not self._forward(data, dst):
                    break
        except OSError:
            pass
        finally:
            self._forget(src, dst)

    def _forward(self, data: bytes, dst: socket.socket) -> bool:
        """Send ``data`` with the current faults applied; False when the connection must end."""
        if self.delay_s:
            time.sleep(self.delay_s)
        if self._cut_next:
            self._cut_next = False
            self.cuts += 1
            dst.sendall(data[: max(1, len(data) // 2)])
            return False
        rate = self.rate_bps
        if rate:
            for i in range(0, len(data), 256):
                dst.sendall(data[i:i + 256])
                time.sleep(min(256, len(data) - i) / rate)
        else:
            dst.sendall(data)
        return True

    def _forget(self, src: socket.socket, dst: socket.socket) -> None:
        with self._lock:
            self._pairs = [p for p in self._pairs if src not in p]
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
