"""ctl/cap/fetch.py: the one GET of the CAP side, against a real HTTP server on loopback."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ctl.cap.fetch import FetchError, get


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        if self.path == "/drip":                      # 1 byte every 0.2 s, for ever
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            return
        body = b"y" * (5000 if self.path == "/big" else 100)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def base():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_get_returns_the_body_and_refuses_what_it_must(base):
    assert get(f"{base}/ok", max_bytes=1000, timeout=5, too_big="x") == b"y" * 100
    cases = {f"{base}/missing": "HTTP 404", f"{base}/big": "over media.max_bytes (1000 bytes)",
             "file:///etc/passwd": "not an http(s) URL", "http://u:p@127.0.0.1/": "credentials",
             "http://127.0.0.1:9/": "ConnectionError"}
    for url, why in cases.items():
        with pytest.raises(FetchError, match=why.replace("(", r"\(").replace(")", r"\)")):
            get(url, max_bytes=1000, timeout=5, too_big="media.max_bytes")


def test_a_server_that_drips_is_cut_at_the_overall_deadline(base):
    t0 = time.monotonic()
    with pytest.raises(FetchError, match="not complete within 1 s"):
        get(f"{base}/drip", max_bytes=10_000, timeout=1, too_big="x")
    assert time.monotonic() - t0 < 3      # each byte came within the socket timeout
