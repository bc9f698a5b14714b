"""The console's application without a browser (Starlette's TestClient), against a real
mosquitto and the relay's real store: users and lock-out, uploads checked by content and
served by sha256, schedule and board pushes (validated by the agent's rules, diffed, signed,
retained), alert acknowledgement, reports, board preview, headers and the ``user`` command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import warnings
import wave

import pytest
import yaml

from agent import protocol
from ctl import config as ctl_config_mod
from ctl.console import serve
from ctl.console.routes import make_app
from ctl.console.users import LoginRefused, UserError
from ctl.relay import Relay, RelaySettings
from tests.conftest import Broker, Keys, Watcher, free_port, wait_until
from tests.console_support import PASSWORD, ctl_config, ctl_here

DEVICE, OTHER = "krongpa-phutuc-c03", "krongpa-chuse-c01"
with warnings.catch_warnings():  # Starlette's TestClient says it will leave httpx
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("console-app")
    with contextlib.ExitStack() as stack:  # whatever started is stopped, also on a failure
        broker = Broker(folder / "broker").start()
        stack.callback(broker.stop)
        keys = Keys()
        path = ctl_config(folder, broker.port, keys, free_port(), lockout_after=3,
                          login_per_minute=1000)
        cfg = ctl_config_mod.load(str(path))
        from ctl.store import open_store

        store = open_store(cfg["relay"])
        stack.callback(store.close)
        console = serve.build(cfg, store)
        console.link.start()
        stack.callback(console.link.stop)
        console.fleet.start()
        stack.callback(console.fleet.stop)
        assert console.link.connected.wait(10)
        for name, role, groups in (("admin", "admin", []), ("op", "operator", ["phutuc"]),
                                   ("xem", "viewer", [])):
            console.users.add(name, role, PASSWORD, groups)
        relay = Relay(store, RelaySettings(), "ttcs")
        now = int(time.time() * 1000)
        for dev in (DEVICE, OTHER):
            relay.handle(f"ttcs/dev/{dev}/status", json.dumps(
                {"v": 1, "state": "online", "ts": now, "session": 1}).encode(), False, now)
        relay.handle(f"ttcs/dev/{DEVICE}/health", json.dumps(
            {"v": 1, "ts": now, "system": {"cpu_temp_c": 51.5, "load": [0.4, 0.3, 0.2]},
             "disk_free_mb": {"state": 900, "cache": "<script>"}}).encode(), False, now)
        relay.handle(f"ttcs/dev/{DEVICE}/event", json.dumps(
            {"v": 1, "seq": 1, "ts": now, "type": "alert", "state": "raised",
             "code": "door_open", "key": "cabinet"}).encode(), False, now)
        console.fleet.refresh()  # the fleet as the relay just stored it (then every 0.3 s)
        watcher = Watcher(broker.port, ["ttcs/#"])
        stack.callback(watcher.close)
        ns = type("Env", (), {})()
        ns.cfg, ns.path, ns.store, ns.console, ns.keys, ns.watcher, ns.folder = \
            cfg, path, store, console, keys, watcher, folder
        ns.app = make_app(console)
        yield ns


def _client(env, name: str | None = None) -> tuple[TestClient, str]:
    """A client logged in as ``name`` and its CSRF token."""
    client = TestClient(env.app, client=("10.0.0.7", 5000))
    if name is None:
        return client, ""
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"name": name, "password": PASSWORD, "csrf": token,
                                    "next": "/"}, follow_redirects=False)
    assert r.status_code == 303, r.text
    home = client.get("/")
    return client, re.search(r'<meta name="csrf" content="([^"]+)"', home.text).group(1)


def _signed_by(doc: dict, keys) -> bool:
    """The district key's signature over the document (raises when it is not)."""
    import base64

    assert doc["sig"]["kid"] == keys.kid
    keys.private.public_key().verify(base64.b64decode(doc["sig"]["val"]),
                                     protocol.signed_bytes(doc))
    return True


def _wav(seconds: float = 0.2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * int(8000 * seconds))
    return buf.getvalue()


def test_passwords_are_argon2id_and_names_lock_out(env):
    users = env.console.users
    row = env.store.one("SELECT hash FROM console_users WHERE name='op'")
    assert row["hash"].startswith("$argon2id$")
    users.add("khoa", "viewer", PASSWORD, [])
    for _ in range(3):
        with pytest.raises(LoginRefused) as e:
            users.login("khoa", "sai mật khẩu rồi", "10.0.0.9")
        assert e.value.reason == "bad"
    with pytest.raises(LoginRefused) as e:  # locked: even the right password is refused
        users.login("khoa", PASSWORD, "10.0.0.9")
    assert e.value.reason == "locked"
    assert users.login("xem", PASSWORD, "10.0.0.9").role == "viewer"  # others unaffected
    with pytest.raises(UserError, match="at least 8"):
        users.add("ngan", "viewer", "short", [])
    with pytest.raises(UserError, match="--groups"):
        users.add("op2", "operator", PASSWORD, [])


def test_login_rate_is_limited_per_address(env):
    from ctl.console.users import LoginPolicy, UserStore

    users = UserStore(env.store, LoginPolicy(lockout_after=100, per_minute=3))
    for _ in range(3):
        with pytest.raises(LoginRefused):
            users.login("admin", "wrong-wrong", "10.9.9.9")
    with pytest.raises(LoginRefused) as e:
        users.login("admin", PASSWORD, "10.9.9.9")
    assert e.value.reason == "rate"
    assert users.login("admin", PASSWORD, "10.9.9.10").admin  # another address


def test_cookies_and_headers(env):
    client = TestClient(env.app)
    r = client.get("/login")
    assert r.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    env.console.secure_cookies = True
    try:
        client = TestClient(env.app)
        page = client.get("/login")
        assert "secure" in page.headers["set-cookie"].lower()
        token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        # the Secure cookie is not sent back over http by the client: the login's CSRF fails
        r = client.post("/login", data={"name": "admin", "password": PASSWORD, "csrf": token},
                        follow_redirects=False)
        assert r.status_code == 403
    finally:
        env.console.secure_cookies = False
    client, _ = _client(env, "admin")
    cookie = next(c for c in client.cookies.jar if c.name == "ttcs_session")
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert "samesite=strict" in str(client.get("/login").headers.get("set-cookie", "")).lower()


def test_upload_checked_by_content_stored_by_sha256_and_served(env):
    client, csrf = _client(env, "op")
    before = len(env.watcher.messages)
    fake = b"<script>alert(1)</script>" + b" " * 100
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "file", "target": f"dev/{DEVICE}",
                                        "priority": "normal"},
                    files={"file1": ("bantin.mp3", fake, "audio/mpeg")})
    assert r.status_code == 400 and "not an MP3, WAV or OGG" in r.text
    data = _wav()
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "file", "target": f"dev/{DEVICE}",
                                        "priority": "priority", "lang1": "vi",
                                        "board_text": "Thông báo"},
                    files={"file1": ("a.wav", data, "application/octet-stream")},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    media = TestClient(env.app).get(f"/media/{sha}.wav")  # devices fetch without a login
    assert media.status_code == 200 and media.content == data
    assert media.headers["content-type"] == "audio/wav"
    assert TestClient(env.app).get("/media/../ctl.yaml").status_code == 404
    cmd = wait_until(lambda: [json.loads(p) for t, p, _ in env.watcher.messages[before:]
                              if t == f"ttcs/dev/{DEVICE}/cmd"], 5, what="the play command")[0]
    assert cmd["type"] == "play" and cmd["args"]["media"]["sha256"] == sha
    assert cmd["args"]["media"]["url"].endswith(f"/media/{sha}.wav")
    assert _signed_by(cmd, env.keys)


def test_viewer_sends_nothing(env):
    client, csrf = _client(env, "xem")
    assert client.get("/bulletins").status_code == 403
    stored = set(os.listdir(env.cfg["media"]["dir"])) if os.path.isdir(
        env.cfg["media"]["dir"]) else set()
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "file", "target": "grp/phutuc"},
                    files={"file1": ("x.wav", _wav(0.05), "audio/wav")})
    assert r.status_code == 403
    assert (set(os.listdir(env.cfg["media"]["dir"])) if os.path.isdir(
        env.cfg["media"]["dir"]) else set()) == stored  # a refused upload is not kept
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "tts", "text": "x",
                                        "target": "grp/phutuc"}, follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/schedule/preview", data={"csrf": csrf, "target": "grp/phutuc",
                                               "yaml": "items: []"})
    assert r.status_code == 403


def test_schedule_validated_diffed_signed_and_retained(env):
    client, csrf = _client(env, "op")
    bad = "items:\n  - id: sang\n    say: Bản tin sáng\n    days: [mon]\n    times: ['25:00']\n"
    r = client.post("/schedule/preview", data={"csrf": csrf, "target": "grp/phutuc",
                                               "yaml": bad})
    assert r.status_code == 400 and "times" in r.text  # the agent's own message
    good = ("items:\n  - id: sang\n    say: Bản tin sáng\n    days: [mon, tue]\n"
            "    times: ['05:30']\n    catch_up_s: 600\n")
    r = client.post("/schedule/preview", data={"csrf": csrf, "target": "grp/phutuc",
                                               "yaml": good})
    assert r.status_code == 200 and "+      &#34;times&#34;: [" in r.text  # the diff
    assert "05:30" in r.text and 'id="push"' in r.text
    rev = re.search(r'name="rev" value="(\d+)"', r.text).group(1)
    time.sleep(1.1)  # with nothing live the rev is the time: the one shown is the one pushed
    r = client.post("/schedule/push", data={"csrf": csrf, "target": "grp/phutuc", "yaml": good,
                                            "rev": rev, "live": ""}, follow_redirects=False)
    assert r.status_code == 303, r.text
    topic = "ttcs/grp/phutuc/desired/schedule"
    doc = wait_until(lambda: [json.loads(p) for t, p, _ in env.watcher.messages
                              if t == topic], 5, what="the retained schedule")[-1]
    assert doc["rev"] == int(rev) and doc["args"]["items"][0]["catch_up_s"] == 600
    assert _signed_by(doc, env.keys)
    wait_until(lambda: env.console.link.document("grp/phutuc", "schedule"), 5)
    page = client.get("/schedule?target=grp/phutuc")
    assert "Bản tin sáng" in page.text and f">{rev}<" in page.text
    # another commune's group: refused on the server
    r = client.post("/schedule/push", data={"csrf": csrf, "target": "grp/chuse", "yaml": good,
                                            "rev": "1"})
    assert r.status_code == 403
    assert not [t for t, _, _ in env.watcher.messages if t.startswith("ttcs/grp/chuse/")]


def test_board_push_and_preview(env):
    client, csrf = _client(env, "admin")
    text = "messages:\n  - id: m1\n    text: Phòng chống bão số 3\nrotate_s: 10\n"
    r = client.post("/board/preview", data={"csrf": csrf, "target": "grp/krongpa",
                                            "yaml": text})
    assert r.status_code == 200, r.text
    rev = re.search(r'name="rev" value="(\d+)"', r.text).group(1)
    r = client.post("/board/push", data={"csrf": csrf, "target": "grp/krongpa", "yaml": text,
                                         "rev": rev, "live": ""}, follow_redirects=False)
    assert r.status_code == 303
    wait_until(lambda: env.console.link.document("grp/krongpa", "board"), 5)
    page = client.get("/board?target=grp/krongpa")
    assert "/board/preview.png?text=" in page.text
    img = client.get("/board/preview.png", params={"text": "Phòng chống bão số 3"})
    assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    stale = client.post("/board/push", data={"csrf": csrf, "target": "grp/krongpa",
                                             "yaml": text, "rev": rev, "live": ""})
    assert stale.status_code == 409  # the live rev moved on since that diff


def test_alert_acknowledged_with_a_note(env):
    viewer, vcsrf = _client(env, "xem")
    assert "door_open" in viewer.get("/alerts").text
    r = viewer.post("/alerts/ack", data={"csrf": vcsrf, "device": DEVICE, "seq": "1",
                                         "note": "x"})
    assert r.status_code == 403
    client, csrf = _client(env, "op")
    r = client.post("/alerts/ack", data={"csrf": csrf, "device": DEVICE, "seq": "1",
                                         "note": "Đã cử kỹ thuật viên"}, follow_redirects=False)
    assert r.status_code == 303
    page = client.get("/alerts").text
    assert "Đã cử kỹ thuật viên" in page
    audit = client.get("/audit").text
    assert "alert_ack" in audit


def test_operator_sees_only_their_devices_and_reports(env):
    client, _ = _client(env, "op")
    fleet = client.get("/api/fleet").json()
    assert [d["device"] for d in fleet["devices"]] == [DEVICE]
    assert client.get(f"/devices/{OTHER}").status_code == 403
    page = client.get(f"/devices/{DEVICE}")
    assert page.status_code == 200
    assert "CPU 51.5 °C" in page.text and "&lt;script&gt;" in page.text  # device data escaped
    assert page.text.count('r="3" class="temp"/>') == 1  # the one sample, as a dot
    r = client.get("/reports", params={"month": "2026-11"})
    assert r.status_code == 200 and DEVICE in r.text and OTHER not in r.text
    csv = client.get("/reports/csv", params={"month": "2026-11"})
    assert csv.text.splitlines()[0].startswith("scope,name,")
    assert OTHER not in csv.text


def test_user_command(env, capsys):
    pw = env.folder / "pw"
    pw.write_text("một mật khẩu dài\n")
    assert ctl_here(env.path, "user", "add", "moi", "--role", "operator", "--groups", "phutuc",
                    "--emergency", "--password-file", str(pw)) == 0
    assert ctl_here(env.path, "user", "add", "moi", "--role", "viewer", "--password-file",
                    str(pw)) == 64
    assert "exists" in capsys.readouterr().err
    assert ctl_here(env.path, "user", "list") == 0
    assert "moi operator groups=phutuc emergency" in capsys.readouterr().out
    assert ctl_here(env.path, "user", "passwd", "moi", "--password-file", str(pw)) == 0
    assert ctl_here(env.path, "user", "del", "moi") == 0
    assert ctl_here(env.path, "user", "del", "moi") == 64
    assert yaml.safe_load(env.path.read_text())["console"]["lockout_after"] == 3

def test_emergency_with_the_grant_and_admin_everywhere(env):
    env.console.users.add("op-grant", "operator", PASSWORD, ["phutuc"], emergency=True)
    client, csrf = _client(env, "op-grant")
    assert 'value="emergency"' in client.get("/bulletins").text
    before = len(env.watcher.messages)
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "tts", "text": "Bão số 3",
                                        "target": "grp/phutuc", "priority": "emergency"},
                    follow_redirects=False)
    assert r.status_code == 303
    admin, acsrf = _client(env, "admin")
    r = admin.post("/bulletins", data={"csrf": acsrf, "mode": "tts", "text": "Toàn huyện",
                                       "target": ["grp/all", f"dev/{OTHER}"],
                                       "priority": "emergency"}, follow_redirects=False)
    assert r.status_code == 303
    sent = wait_until(lambda: [(t, json.loads(p)) for t, p, _ in env.watcher.messages[before:]
                               if t.endswith("/cmd")] if len(
        [1 for t, _, _ in env.watcher.messages[before:] if t.endswith("/cmd")]) >= 3 else None,
        5, what="three commands")
    assert sorted(t for t, _ in sent) == ["ttcs/dev/krongpa-chuse-c01/cmd",
                                          "ttcs/grp/all/cmd", "ttcs/grp/phutuc/cmd"]
    assert all(m["args"]["priority"] == "emergency" and m["type"] == "say" for _, m in sent)
    page = admin.get(r.headers["location"]).text  # the sent page lists both targets
    assert "grp/all" in page and f"dev/{OTHER}" in page
    bad = admin.post("/bulletins", data={"csrf": acsrf, "mode": "tts", "text": "x" * 5001,
                                         "target": "grp/all"})
    assert bad.status_code == 400 and "5000" in bad.text  # the agent's own limit


def test_spoken_bulletin_at_a_time_is_say_with_at(env):
    """A spoken bulletin for later: ``say`` with ``at`` (the devices speak it at that time);
    ``at`` is checked by the agent's own rule (at most 7 days ahead)."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    client, csrf = _client(env, "op")
    now = dt.datetime.now(ZoneInfo("Asia/Ho_Chi_Minh")).replace(second=0, microsecond=0)
    at = now + dt.timedelta(hours=2)
    before = len(env.watcher.messages)
    form = {"csrf": csrf, "mode": "tts", "lang": "vi", "text": "Bản tin buổi chiều",
            "target": "grp/phutuc"}
    r = client.post("/bulletins", data={**form, "at": at.strftime("%Y-%m-%dT%H:%M")},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    cmd = wait_until(lambda: [json.loads(p) for t, p, _ in env.watcher.messages[before:]
                              if t == "ttcs/grp/phutuc/cmd"], 10, what="the command")[0]
    assert cmd["type"] == "say" and cmd["args"]["at"] == int(at.timestamp() * 1000)
    assert cmd["args"]["text"] == "Bản tin buổi chiều" and cmd["args"]["lang"] == "vi"
    far = now + dt.timedelta(days=30)
    r = client.post("/bulletins", data={**form, "at": far.strftime("%Y-%m-%dT%H:%M")},
                    follow_redirects=False)
    assert r.status_code == 400 and "at" in r.text


def test_serve_refuses_to_start_without_the_signing_key(env, capsys):
    cfg = yaml.safe_load(env.path.read_text())
    cfg["signing"] = {"kid": None, "key_file": None}
    path = env.folder / "unsigned.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert ctl_here(path, "serve") == 64
    assert "the console signs every command" in capsys.readouterr().err
    assert ctl_here(env.path, "serve", "--listen", "nowhere") == 64
    assert "HOST:PORT" in capsys.readouterr().err


def test_recordings_per_language_become_variants(env):
    client, csrf = _client(env, "op")
    before = len(env.watcher.messages)
    r = client.post("/bulletins", data={"csrf": csrf, "mode": "file", "target": f"dev/{DEVICE}",
                                        "lang1": "vi", "lang2": "jra", "repeat": "2"},
                    files={"file1": ("vi.wav", _wav(0.1), "audio/wav"),
                           "file2": ("jra.wav", _wav(0.3), "audio/wav")},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    cmd = wait_until(lambda: [json.loads(p) for t, p, _ in env.watcher.messages[before:]
                              if t == f"ttcs/dev/{DEVICE}/cmd"], 5, what="the command")[0]
    assert [m["lang"] for m in cmd["args"]["media"]] == ["vi", "jra"]
    assert cmd["args"]["repeat"] == 2


def test_serve_without_the_relay_and_a_clean_stop(env):
    from tests.console_support import Serve

    port = free_port()
    serve = Serve(env.path, port, env.folder / "no-relay.log", "--no-relay",
                  "--listen", f"127.0.0.1:{port}").start()
    try:
        import urllib.request

        with urllib.request.urlopen(f"{serve.url}/login", timeout=5) as r:
            assert r.status == 200
    finally:
        assert serve.stop() == 0, serve.log()[-2000:]
    assert "relay not started: --no-relay" in serve.log()
    assert "relay stopped" not in serve.log() and "console stopped" in serve.log()


def test_schedule_table_edits_add_and_remove_items(env):
    client, csrf = _client(env, "admin")
    target = "grp/krongpa"
    form = {"csrf": csrf, "target": target, "op": "add", "item_id": "sang", "times": "05:30",
            "days": ["mon", "sat"], "say": "Bản tin sáng", "priority": "normal",
            "catch_up_s": "600"}
    r = client.post("/schedule/preview", data={**form, "times": "5h30"})
    assert r.status_code == 400 and "times" in r.text  # the agent's rule, on a table edit too
    r = client.post("/schedule/preview", data=form)
    assert r.status_code == 200, r.text
    draft = re.search(r'<textarea name="yaml" hidden>(.*?)</textarea>', r.text, re.S).group(1)
    import html

    args = yaml.safe_load(html.unescape(draft))
    assert args == {"items": [{"id": "sang", "say": "Bản tin sáng", "days": ["mon", "sat"],
                               "times": ["05:30"], "priority": "normal", "catch_up_s": 600}]}
    rev = re.search(r'name="rev" value="(\d+)"', r.text).group(1)
    r = client.post("/schedule/push", data={"csrf": csrf, "target": target, "rev": rev,
                                            "live": "", "yaml": html.unescape(draft)},
                    follow_redirects=False)
    assert r.status_code == 303
    wait_until(lambda: env.console.link.document(target, "schedule"), 5)
    r = client.post("/schedule/preview", data={"csrf": csrf, "target": target, "op": "remove",
                                               "item_id": "sang"})
    assert r.status_code == 200 and '-      &#34;id&#34;: &#34;sang&#34;' in r.text


def test_board_preview_of_a_long_text_is_bounded_and_kept(env):
    from ctl.console import pages_docs

    client, _ = _client(env, "xem")  # reading: a viewer may look
    text = "Thông báo lịch cắt điện toàn xã " * 30  # ~1,000 characters: a long scroll
    first = client.get("/board/preview.png", params={"text": text})
    assert first.status_code == 200 and first.content[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    im = Image.open(io.BytesIO(first.content))
    assert im.n_frames <= pages_docs.PREVIEW_MAX_S * 50
    assert any(key[1] == text for key in pages_docs._previews)  # kept for the next page
    again = client.get("/board/preview.png", params={"text": text})
    assert again.content == first.content


def test_serve_exits_when_it_cannot_listen(env):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert ctl_here(env.path, "serve", "--no-relay", "--listen", f"127.0.0.1:{port}") == 1
